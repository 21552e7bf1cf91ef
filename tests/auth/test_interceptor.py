"""The authentication interceptor in front of a real registry, deciding with the
real Cedar policies: who gets in, who is refused, and who the service sees."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.shared.auth import AuthInterceptor, Principal, TokenIssuer, TokenVerifier
from conveyor.shared.channel import ClientTLS, create_channel
from conveyor.shared.errors import from_rpc_error
from conveyor.shared.secrets import LocalSecretStore
from tests.auth.support import (
    ALICE,
    MALLORY,
    NOBODY,
    EngineAuthorizer,
    HostedRegistry,
    host_registry,
    registry_resolver,
)
from tests.support.certificates import CertificateAuthority
from tests.support.registry import a_model, refused, set_alias, upload_requests
from tests.support.settings import TestServerSettings

TTL = timedelta(minutes=5)


@pytest.fixture
async def registry(
    tmp_path: Path, secret_store: LocalSecretStore, engine_authorizer: EngineAuthorizer
) -> AsyncIterator[HostedRegistry]:
    hosted = await start(tmp_path, secret_store, engine_authorizer)
    yield hosted
    await hosted.server.shutdown()


async def start(
    directory: Path,
    secret_store: LocalSecretStore,
    authorizer: EngineAuthorizer,
    *,
    tls: dict[str, Path] | None = None,
) -> HostedRegistry:
    settings = TestServerSettings(data_dir=directory, shutdown_grace=timedelta(0), **(tls or {}))
    return await host_registry(
        settings,
        secret_store,
        lambda store: [
            AuthInterceptor(
                "registry",
                TokenVerifier(secret_store, "registry"),
                authorizer,
                registry_resolver(store),
                trust_client_certificates=tls is not None,
            )
        ],
    )


def client(
    hosted: HostedRegistry, token: str | None = None, tls: ClientTLS | None = None
) -> grpc.aio.Channel:
    return create_channel(hosted.target, bearer_token=token, tls=tls)


def token_of(issuer: TokenIssuer, principal: Principal, audience: str = "registry") -> str:
    return issuer.issue(principal, [audience], TTL)


async def create_fraud_model(hosted: HostedRegistry, issuer: TokenIssuer) -> str:
    """``models/fraud`` of team B, with one version; returns the version name."""
    async with client(hosted, token_of(issuer, MALLORY)) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await registry.CreateModel(
            rpc.CreateModelRequest(model_id="fraud", model=a_model(owner_team="team-b")), timeout=10
        )
        reply = await registry.CreateModelVersion(
            upload_requests("models/fraud", b"onnx-bytes"), timeout=30
        )
    return reply.model_version.name


async def test_a_call_without_credentials_is_unauthenticated(
    registry: HostedRegistry, engine_authorizer: EngineAuthorizer
) -> None:
    async with client(registry) as channel:
        error = await refused(
            registry_service_pb2_grpc.RegistryServiceStub(channel).ListModels(
                rpc.ListModelsRequest(), timeout=5
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    assert error.reason == "CREDENTIALS_MISSING"
    assert "bearer token" in error.message
    assert engine_authorizer.asked == []  # never asked: nobody to ask about


@pytest.mark.parametrize(
    ("credential", "reason"),
    [
        ("garbage", "TOKEN_INVALID"),
        ("for-policy", "TOKEN_WRONG_AUDIENCE"),
        ("expired", "TOKEN_EXPIRED"),
    ],
)
async def test_a_bad_token_is_unauthenticated_and_never_logged(
    registry: HostedRegistry,
    issuer: TokenIssuer,
    secret_store: LocalSecretStore,
    credential: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = {
        "garbage": "garbage.garbage.garbage-signature-0123456789",
        "for-policy": token_of(issuer, ALICE, audience="policy"),
        "expired": TokenIssuer(secret_store, clock=lambda: 1_000_000.0).issue(
            ALICE, ["registry"], TTL
        ),
    }[credential]
    with caplog.at_level(logging.DEBUG):
        async with client(registry, token) as channel:
            error = await refused(
                registry_service_pb2_grpc.RegistryServiceStub(channel).ListModels(
                    rpc.ListModelsRequest(), timeout=5
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
    assert error.reason == reason
    assert token not in error.message
    assert all(token not in value for value in error.metadata.values())
    signature = token.rsplit(".", 1)[-1]
    logged = [record.getMessage() + str(vars(record)) for record in caplog.records]
    assert any(reason in line for line in logged)  # the refusal is logged...
    assert not any(token in line or signature in line for line in logged)  # ...not the token


async def test_an_authorization_header_that_is_not_a_bearer_token_is_unauthenticated(
    registry: HostedRegistry,
) -> None:
    async with client(registry) as channel:
        error = await refused(
            registry_service_pb2_grpc.RegistryServiceStub(channel).ListModels(
                rpc.ListModelsRequest(), timeout=5, metadata=(("authorization", "Basic YTpi"),)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    assert error.reason == "BAD_AUTHORIZATION_METADATA"


async def test_a_principal_the_policies_deny_is_refused_with_the_reason(
    registry: HostedRegistry, issuer: TokenIssuer
) -> None:
    async with client(registry, token_of(issuer, NOBODY)) as channel:
        error = await refused(
            registry_service_pb2_grpc.RegistryServiceStub(channel).ListModels(
                rpc.ListModelsRequest(), timeout=5
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert error.reason == "POLICY_DENIED"
    assert "user:nobody registry.ListModels" in error.message
    assert "no policy permits it" in error.message
    assert error.metadata["action"] == "registry.ListModels"
    assert error.metadata["principal"] == "user:nobody"
    assert error.metadata["decision_id"]


async def test_an_allowed_call_runs_as_its_principal(
    registry: HostedRegistry, issuer: TokenIssuer, engine_authorizer: EngineAuthorizer
) -> None:
    async with client(registry, token_of(issuer, MALLORY)) as channel:
        created = await registry_service_pb2_grpc.RegistryServiceStub(channel).CreateModel(
            rpc.CreateModelRequest(model_id="fraud", model=a_model(owner_team="team-b")), timeout=10
        )
    assert created.model.created_by == "user:mallory"  # the servicer's caller_principal
    asked = engine_authorizer.asked[-1]
    assert (asked.principal, asked.action, asked.allowed) == (
        MALLORY,
        "registry.CreateModel",
        True,
    )
    assert asked.resource.owner_team == "team-b"
    assert asked.context == {"authn_method": "jwt"}

    async with client(registry, token_of(issuer, ALICE)) as channel:  # anyone may read
        got = await registry_service_pb2_grpc.RegistryServiceStub(channel).GetModel(
            rpc.GetModelRequest(name="models/fraud"), timeout=5
        )
    assert got.model.owner_team == "team-b"


async def test_a_data_scientist_cannot_alias_another_teams_model(
    registry: HostedRegistry, issuer: TokenIssuer, engine_authorizer: EngineAuthorizer
) -> None:
    version = await create_fraud_model(registry, issuer)

    async with client(registry, token_of(issuer, ALICE)) as channel:
        error = await refused(
            set_alias(
                registry_service_pb2_grpc.RegistryServiceStub(channel),
                "models/fraud/aliases/staging",
                version,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert "forbid-cross-team-alias" in error.message
    assert "forbid-cross-team-alias" in error.metadata["policy_ids"]
    asked = engine_authorizer.asked[-1]
    assert asked.action == "registry.SetAlias"
    assert asked.resource.owner_team == "team-b"
    assert asked.context == {"authn_method": "jwt", "alias": "staging"}

    async with client(registry, token_of(issuer, MALLORY)) as channel:  # the owners may
        alias = await set_alias(
            registry_service_pb2_grpc.RegistryServiceStub(channel),
            "models/fraud/aliases/staging",
            version,
        )
    assert alias.updated_by == "user:mallory"


async def test_an_upload_is_authorized_on_its_first_message(
    registry: HostedRegistry, issuer: TokenIssuer, engine_authorizer: EngineAuthorizer
) -> None:
    await create_fraud_model(registry, issuer)
    async with client(registry, token_of(issuer, ALICE)) as channel:
        error = await refused(
            registry_service_pb2_grpc.RegistryServiceStub(channel).CreateModelVersion(
                upload_requests("models/fraud", b"x" * 3_000_000), timeout=30
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )
    assert error.reason == "POLICY_DENIED"
    asked = engine_authorizer.asked[-1]
    assert asked.action == "registry.CreateModelVersion"
    assert (asked.resource.type, asked.resource.name, asked.resource.owner_team) == (
        "registry.conveyor.dev/Model",
        "models/fraud",
        "team-b",
    )

    async with client(registry) as channel:
        await refused(
            registry_service_pb2_grpc.RegistryServiceStub(channel).CreateModelVersion(
                upload_requests("models/fraud", b"x" * 3_000_000), timeout=30
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )

    async with client(registry, token_of(issuer, MALLORY)) as channel:
        reply = await registry_service_pb2_grpc.RegistryServiceStub(channel).CreateModelVersion(
            upload_requests("models/fraud", b"y" * 3_000_000), timeout=30
        )
    assert reply.model_version.created_by == "user:mallory"


async def test_a_server_stream_is_authorized_before_it_starts(
    registry: HostedRegistry, issuer: TokenIssuer
) -> None:
    version = await create_fraud_model(registry, issuer)
    request = rpc.DownloadArtifactRequest(name=version)
    async with client(registry, token_of(issuer, NOBODY)) as channel:
        stream = registry_service_pb2_grpc.RegistryServiceStub(channel).DownloadArtifact(
            request, timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            _ = [message async for message in stream]
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert from_rpc_error(raised.value).reason == "POLICY_DENIED"

    async with client(registry, token_of(issuer, ALICE)) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        chunks = [m.data async for m in stub.DownloadArtifact(request, timeout=10)]
    assert b"".join(chunks) == b"onnx-bytes"


async def test_health_and_reflection_need_no_credentials(registry: HostedRegistry) -> None:
    async with client(registry) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        replies = [reply async for reply in stream]
    services = {s.name for s in replies[0].list_services_response.service}
    assert "conveyor.registry.v1.RegistryService" in services


async def test_a_client_certificate_names_a_service_principal(
    tmp_path: Path,
    secret_store: LocalSecretStore,
    engine_authorizer: EngineAuthorizer,
    issuer: TokenIssuer,
) -> None:
    authority = CertificateAuthority(tmp_path)
    server_certificate = authority.issue("registry", server=True)
    hosted = await start(
        tmp_path,
        secret_store,
        engine_authorizer,
        tls={
            "tls_cert_file": server_certificate.certificate,
            "tls_key_file": server_certificate.key,
            "tls_client_ca_file": authority.certificate,
        },
    )
    trainer = authority.issue("trainer", server=False)
    tls = ClientTLS(
        root_certificates=authority.certificate.read_bytes(),
        certificate_chain=trainer.certificate.read_bytes(),
        private_key=trainer.key.read_bytes(),
    )
    try:
        # A token, when sent, names the caller even over mTLS.
        async with client(hosted, token_of(issuer, MALLORY), tls) as channel:
            await registry_service_pb2_grpc.RegistryServiceStub(channel).CreateModel(
                rpc.CreateModelRequest(model_id="fraud", model=a_model(owner_team="team-b")),
                timeout=10,
            )
        assert engine_authorizer.asked[-1].context["authn_method"] == "jwt"

        async with client(hosted, tls=tls) as channel:
            registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
            reply = await registry.CreateModelVersion(
                upload_requests("models/fraud", b"trained"), timeout=30
            )
            asked = engine_authorizer.asked[-1]
            denied = await refused(
                registry.ListModels(rpc.ListModelsRequest(), timeout=5),
                grpc.StatusCode.PERMISSION_DENIED,
            )
    finally:
        await hosted.server.shutdown()
    assert reply.model_version.created_by == "service:trainer"
    assert asked.principal == Principal(kind="service", id="trainer", roles=("service",))
    assert asked.context == {"authn_method": "mtls"}
    assert "service:trainer registry.ListModels" in denied.message
