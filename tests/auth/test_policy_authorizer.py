"""Asking the policy service: cached answers, service tokens, and refusal when it
cannot answer (fail closed)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format

from conveyor.policy.v1 import policy_messages_pb2 as messages
from conveyor.policy.v1 import policy_service_pb2_grpc
from conveyor.policy.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.services.policy.engine import PolicyEngine
from conveyor.services.registry.settings import RegistrySettings
from conveyor.services.registry.store import RegistryStore
from conveyor.shared.auth import (
    AuthInterceptor,
    AuthSettings,
    DecisionCache,
    PolicyServiceAuthorizer,
    Principal,
    Resource,
    TokenIssuer,
    TokenVerifier,
    default_resolver,
    server_auth_interceptors,
    service_channel,
)
from conveyor.shared.channel import create_channel
from conveyor.shared.errors import UnavailableError
from conveyor.shared.secrets import LocalSecretStore
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from tests.auth.support import (
    ALICE,
    NOBODY,
    EngineAuthorizer,
    HostedRegistry,
    ManualClock,
    host_registry,
    registry_resolver,
)
from tests.support.registry import a_model, refused
from tests.support.settings import TestServerSettings

POLICY_SERVICE = "conveyor.policy.v1.PolicyService"
MODEL = Resource(type="registry.conveyor.dev/Model", name="models/fraud", owner_team="team-a")


@dataclass
class EnginePolicyService(policy_service_pb2_grpc.PolicyServiceServicer):
    """``PolicyService.Authorize`` answered by the real policies (no audit log)."""

    engine: PolicyEngine
    cache_ttl: timedelta = timedelta(seconds=5)
    questions: list[messages.AuthorizeRequest] = field(default_factory=list)

    async def Authorize(self, request: messages.AuthorizeRequest, context: Any) -> Any:
        self.questions.append(request)
        context_values = json_format.MessageToDict(request.context)
        decision = self.engine.authorize(
            Principal.from_proto(request.principal),
            request.action,
            Resource.from_proto(request.resource),
            context_values,
        )
        ttl = duration_pb2.Duration()
        ttl.FromTimedelta(self.cache_ttl)
        return messages.AuthorizeResponse(
            outcome=pb.OUTCOME_ALLOW if decision.allowed else pb.OUTCOME_DENY,
            policy_ids=decision.policy_ids,
            decision_id=f"d{len(self.questions)}",
            policy_set_digest=decision.policy_set_digest,
            reasons=decision.reasons,
            cache_ttl=ttl,
        )


@dataclass
class PolicyServer:
    server: ConveyorServer
    servicer: EnginePolicyService
    authorizer: EngineAuthorizer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture
async def policy_server(
    tmp_path: Path, secret_store: LocalSecretStore, policy_engine: PolicyEngine
) -> AsyncIterator[PolicyServer]:
    """A policy server shaped like the real one: its own interceptor checks the
    callers' tokens and asks the policies in process."""
    servicer = EnginePolicyService(policy_engine)
    authorizer = EngineAuthorizer(policy_engine)
    server = await create_server(
        TestServerSettings(data_dir=tmp_path / "policy"),
        [
            ServiceRegistration(
                POLICY_SERVICE,
                lambda s: policy_service_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, s),
            )
        ],
        interceptors=[
            AuthInterceptor(
                "policy",
                TokenVerifier(secret_store, "policy"),
                authorizer,
                default_resolver("policy"),
            )
        ],
    )
    yield PolicyServer(server, servicer, authorizer)
    await server.server.stop(None)


def registry_settings(tmp_path: Path, policy_addr: str) -> RegistrySettings:
    return RegistrySettings(
        data_dir=tmp_path, shutdown_grace=timedelta(0), auth=AuthSettings(policy_addr=policy_addr)
    )


async def host_with_auth(
    settings: RegistrySettings, secret_store: LocalSecretStore
) -> HostedRegistry:
    """The registry servicer behind ``server_auth_interceptors``, closed on shutdown."""
    interceptors: list[Any] = []

    def build(store: RegistryStore) -> list[Any]:
        interceptors.extend(
            server_auth_interceptors(settings, secret_store, resolver=registry_resolver(store))
        )
        return interceptors

    hosted = await host_registry(settings, secret_store, build)
    hosted.server.on_shutdown.extend(interceptor.close for interceptor in interceptors)
    return hosted


def unused_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


async def test_answers_are_cached_within_their_ttl(
    policy_server: PolicyServer, secret_store: LocalSecretStore, tmp_path: Path
) -> None:
    clock = ManualClock()
    channel = service_channel(
        registry_settings(tmp_path, policy_server.target),
        secret_store,
        target=policy_server.target,
        audience="policy",
    )
    authorizer = PolicyServiceAuthorizer(
        channel, DecisionCache(100, timedelta(seconds=3), clock=clock)
    )
    try:
        first = await authorizer.authorize(
            ALICE, "registry.GetModel", MODEL, {"authn_method": "jwt"}
        )
        again = await authorizer.authorize(
            ALICE, "registry.GetModel", MODEL, {"authn_method": "jwt"}
        )
        assert first.allowed
        assert again == first
        assert len(policy_server.servicer.questions) == 1
        assert first.cache_ttl == timedelta(seconds=5)

        denied = await authorizer.authorize(NOBODY, "registry.GetModel", MODEL, {})
        assert not denied.allowed
        assert denied.decision_id == "d2"
        assert "no policy permits it" in denied.reasons[0]

        clock.advance(3)  # the cache keeps answers 3 s at most, whatever the service allows
        await authorizer.authorize(ALICE, "registry.GetModel", MODEL, {"authn_method": "jwt"})
        assert len(policy_server.servicer.questions) == 3
    finally:
        await authorizer.close()

    question = policy_server.servicer.questions[0]
    assert Principal.from_proto(question.principal) == ALICE
    assert Resource.from_proto(question.resource) == MODEL
    assert question.action == "registry.GetModel"
    # The registry asked as itself, with a token the policy server verified.
    asker = policy_server.authorizer.asked[0]
    assert asker.principal == Principal(kind="service", id="registry", roles=("service",))
    assert (asker.action, asker.allowed) == ("policy.Authorize", True)


async def test_no_answer_from_the_policy_service_refuses_the_call(
    secret_store: LocalSecretStore, tmp_path: Path
) -> None:
    authorizer = PolicyServiceAuthorizer(
        create_channel(unused_address()), DecisionCache(10, timedelta(seconds=5))
    )
    try:
        with pytest.raises(UnavailableError) as raised:
            await authorizer.authorize(ALICE, "registry.GetModel", MODEL, {})
    finally:
        await authorizer.close()
    assert raised.value.reason == "POLICY_UNAVAILABLE"
    assert raised.value.metadata["failure"] == "UNAVAILABLE"


async def test_a_policy_service_that_refuses_the_caller_refuses_the_call(
    policy_server: PolicyServer, secret_store: LocalSecretStore
) -> None:
    # The channel sends a user's token: the policy service takes Authorize from
    # services only, so there is no answer, and the call is refused.
    user_token = TokenIssuer(secret_store).issue(ALICE, ["policy"], timedelta(minutes=5))
    authorizer = PolicyServiceAuthorizer(
        policy_service_pb2_grpc.PolicyServiceStub(
            create_channel(policy_server.target, bearer_token=user_token)
        ),
        DecisionCache(10, timedelta(seconds=5)),
    )
    with pytest.raises(UnavailableError) as raised:
        await authorizer.authorize(ALICE, "registry.GetModel", MODEL, {})
    assert raised.value.metadata["failure"] == "PERMISSION_DENIED"


async def test_a_server_whose_policy_service_is_down_refuses_every_call(
    tmp_path: Path, secret_store: LocalSecretStore
) -> None:
    hosted = await host_with_auth(registry_settings(tmp_path, unused_address()), secret_store)
    token = TokenIssuer(secret_store).issue(ALICE, ["registry"], timedelta(minutes=5))
    try:
        async with create_channel(hosted.target, bearer_token=token) as channel:
            error = await refused(
                registry_service_pb2_grpc.RegistryServiceStub(channel).ListModels(
                    rpc.ListModelsRequest(), timeout=5
                ),
                grpc.StatusCode.UNAVAILABLE,
            )
    finally:
        await hosted.server.shutdown()
    assert error.reason == "POLICY_UNAVAILABLE"


async def test_server_auth_interceptors_ask_the_policy_service_as_the_service(
    tmp_path: Path, secret_store: LocalSecretStore, policy_server: PolicyServer
) -> None:
    hosted = await host_with_auth(registry_settings(tmp_path, policy_server.target), secret_store)
    issuer = TokenIssuer(secret_store)
    mallory = Principal(kind="user", id="mallory", roles=("data_scientist",), team="team-b")
    try:
        async with create_channel(
            hosted.target, bearer_token=issuer.issue(mallory, ["registry"], timedelta(minutes=5))
        ) as channel:
            registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
            created = await registry.CreateModel(
                rpc.CreateModelRequest(model_id="fraud", model=a_model(owner_team="team-b")),
                timeout=10,
            )
            await registry.GetModel(rpc.GetModelRequest(name="models/fraud"), timeout=5)
            await registry.GetModel(rpc.GetModelRequest(name="models/fraud"), timeout=5)
    finally:
        await hosted.server.shutdown()
    assert created.model.created_by == "user:mallory"
    actions = [q.action for q in policy_server.servicer.questions]
    assert actions == ["registry.CreateModel", "registry.GetModel"]  # the second read: cached
    assert {asked.principal.text for asked in policy_server.authorizer.asked} == {
        "service:registry"
    }


async def test_auth_off_means_no_interceptors(
    tmp_path: Path, secret_store: LocalSecretStore
) -> None:
    settings = RegistrySettings(data_dir=tmp_path, auth=AuthSettings(mode="off"))
    interceptors = server_auth_interceptors(
        settings, secret_store, resolver=default_resolver("registry")
    )
    assert interceptors == []
