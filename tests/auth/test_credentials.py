"""A service's own tokens, tokens on every kind of call, and developer credentials."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import empty_pb2, wrappers_pb2

from conveyor.shared.auth import (
    DEV_USERS,
    Principal,
    ServiceCredentials,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    write_dev_credentials,
)
from conveyor.shared.channel import create_channel
from conveyor.shared.client import ConveyorClient
from conveyor.shared.secrets import LocalSecretStore
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from conveyor.shared.settings import ClientSettings
from tests.auth.support import ManualClock
from tests.support.settings import TestServerSettings

SERVICE = "conveyor.testing.v1.TokenEcho"


def jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def test_a_service_token_is_reused_until_80_percent_of_its_life(issuer: TokenIssuer) -> None:
    clock = ManualClock()
    credentials = ServiceCredentials(issuer, "registry", timedelta(minutes=5), clock=clock)
    first = credentials.token("policy")
    clock.advance(239)  # 80% of 300 s is 240 s
    assert credentials.token("policy") == first
    clock.advance(1)
    renewed = credentials.token("policy")
    assert jti(renewed) != jti(first)
    assert credentials.token("policy") == renewed
    assert repr(credentials) == (
        "ServiceCredentials(principal='service:registry', ttl=datetime.timedelta(seconds=300))"
    )


def test_each_audience_gets_its_own_token(
    issuer: TokenIssuer, secret_store: LocalSecretStore
) -> None:
    credentials = ServiceCredentials(issuer, "registry", timedelta(minutes=5))
    for_policy = credentials.token_provider("policy")()
    for_trainer = credentials.token("trainer")
    registry = Principal(kind="service", id="registry", roles=("service",))
    assert TokenVerifier(secret_store, "policy").verify(for_policy) == registry
    assert TokenVerifier(secret_store, "trainer").verify(for_trainer) == registry
    with pytest.raises(TokenError, match="not meant for the trainer service"):
        TokenVerifier(secret_store, "trainer").verify(for_policy)


class TokenEcho:
    """Answers each kind of call with the ``authorization`` metadata it received."""

    @staticmethod
    def _seen(context: Any) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(
            value=dict(context.invocation_metadata()).get("authorization", "")
        )

    async def unary(self, request: empty_pb2.Empty, context: Any) -> wrappers_pb2.StringValue:
        return self._seen(context)

    async def server_stream(
        self, request: empty_pb2.Empty, context: Any
    ) -> AsyncIterator[wrappers_pb2.StringValue]:
        yield self._seen(context)

    async def client_stream(
        self, requests: AsyncIterator[empty_pb2.Empty], context: Any
    ) -> wrappers_pb2.StringValue:
        async for _ in requests:
            pass
        return self._seen(context)

    async def bidi(
        self, requests: AsyncIterator[empty_pb2.Empty], context: Any
    ) -> AsyncIterator[wrappers_pb2.StringValue]:
        async for _ in requests:
            yield self._seen(context)

    def registration(self) -> ServiceRegistration:
        options: dict[str, Any] = {
            "request_deserializer": empty_pb2.Empty.FromString,
            "response_serializer": wrappers_pb2.StringValue.SerializeToString,
        }
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary, **options),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream, **options),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream, **options),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi, **options),
            },
        )
        return ServiceRegistration(SERVICE, lambda s: s.add_generic_rpc_handlers((handler,)))


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[ConveyorServer]:
    server = await create_server(
        TestServerSettings(data_dir=tmp_path), [TokenEcho().registration()]
    )
    yield server
    await server.server.stop(None)


async def seen_by_each_kind_of_call(channel: grpc.aio.Channel) -> list[str]:
    options: dict[str, Any] = {
        "request_serializer": empty_pb2.Empty.SerializeToString,
        "response_deserializer": wrappers_pb2.StringValue.FromString,
    }

    async def requests() -> AsyncIterator[empty_pb2.Empty]:
        yield empty_pb2.Empty()

    unary = await channel.unary_unary(f"/{SERVICE}/Unary", **options)(empty_pb2.Empty(), timeout=5)
    server_stream = [
        reply
        async for reply in channel.unary_stream(f"/{SERVICE}/ServerStream", **options)(
            empty_pb2.Empty(), timeout=5
        )
    ]
    client_stream = await channel.stream_unary(f"/{SERVICE}/ClientStream", **options)(
        requests(), timeout=5
    )
    bidi = [
        reply
        async for reply in channel.stream_stream(f"/{SERVICE}/Bidi", **options)(
            requests(), timeout=5
        )
    ]
    return [reply.value for reply in (unary, *server_stream, client_stream, *bidi)]


async def test_every_kind_of_call_carries_a_fresh_token_from_the_provider(
    echo: ConveyorServer,
) -> None:
    tokens = iter(f"token-{n}" for n in range(100))
    async with create_channel(f"127.0.0.1:{echo.port}", token_provider=lambda: next(tokens)) as ch:
        seen = await seen_by_each_kind_of_call(ch)
    assert seen == ["Bearer token-0", "Bearer token-1", "Bearer token-2", "Bearer token-3"]


async def test_every_kind_of_call_carries_a_fixed_token(echo: ConveyorServer) -> None:
    async with create_channel(f"127.0.0.1:{echo.port}", bearer_token="fixed") as channel:
        assert await seen_by_each_kind_of_call(channel) == ["Bearer fixed"] * 4


async def test_the_light_client_takes_a_token_provider(echo: ConveyorServer) -> None:
    address = f"127.0.0.1:{echo.port}"
    async with ConveyorClient(
        addresses={"registry": address}, token_provider=lambda: "from-provider"
    ) as client:
        assert (
            await seen_by_each_kind_of_call(client.channel("registry"))
            == ["Bearer from-provider"] * 4
        )
    with pytest.raises(ValueError, match="not both"):
        ConveyorClient(bearer_token="a", token_provider=lambda: "b")
    with pytest.raises(ValueError, match="not both"):
        create_channel(address, bearer_token="a", token_provider=lambda: "b")


def test_dev_credentials_are_private_files_of_valid_tokens(
    secret_store: LocalSecretStore, tmp_path: Path
) -> None:
    directory = tmp_path / "credentials"
    written = write_dev_credentials(secret_store, directory, ttl=timedelta(hours=8))

    assert sorted(written) == sorted(user.id for user in DEV_USERS)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for user in DEV_USERS:
        path = written[user.id]
        assert path == directory / f"{user.id}.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        for audience in ("registry", "policy", "inference"):
            assert TokenVerifier(secret_store, audience).verify(token) == user
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 8 * 3600
    assert not [p for p in directory.iterdir() if p.suffix != ".token"]  # no leftovers

    path = written["alice"]
    path.chmod(0o644)  # rewriting replaces the file, with the right mode
    write_dev_credentials(secret_store, directory, [DEV_USERS[0]])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_user_id_that_cannot_name_a_file_is_refused(
    secret_store: LocalSecretStore, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="cannot name a token file"):
        write_dev_credentials(
            secret_store, tmp_path / "credentials", [Principal(kind="user", id="../evil")]
        )


def test_clients_read_their_token_from_a_file(
    secret_store: LocalSecretStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = write_dev_credentials(secret_store, tmp_path / "credentials", [DEV_USERS[0]])
    monkeypatch.setenv("CONVEYOR_TOKEN_FILE", str(written["alice"]))
    settings = ClientSettings()
    token = settings.bearer_token()
    assert token is not None
    assert TokenVerifier(secret_store, "registry").verify(token) == DEV_USERS[0]
    assert token not in repr(settings)

    monkeypatch.delenv("CONVEYOR_TOKEN_FILE")
    monkeypatch.setenv("CONVEYOR_TOKEN", "inline-token")
    inline = ClientSettings()
    assert inline.bearer_token() == "inline-token"
    assert "inline-token" not in repr(inline)
    monkeypatch.delenv("CONVEYOR_TOKEN")
    assert ClientSettings().bearer_token() is None
