"""Every implemented service refuses every call without valid credentials.

Each service in the catalog is built as ``conveyor serve`` builds it, with
authentication on. Its RPC methods come from the services its server registers
(asked through reflection, which, like health, answers without credentials);
each method is called with an empty request of its own type through a generic
channel: with no credentials, a garbage token, an expired token, a token for
another service, and a token signed with a key the service does not hold. Each
answer must be UNAUTHENTICATED.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conveyor.services import catalog
from conveyor.shared.auth import TokenIssuer
from conveyor.shared.auth.principal import Principal
from conveyor.shared.auth.settings import AuthSettings
from conveyor.shared.errors import UnauthenticatedError, from_rpc_error
from conveyor.shared.secrets import LocalSecretStore, SecretStore
from conveyor.shared.server import ConveyorServer

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
OPEN_METHODS = (
    # The Open Inference Protocol's own health probes, like gRPC health.
    "inference.GRPCInferenceService.ServerLive",
    "inference.GRPCInferenceService.ServerReady",
)
ERIN = Principal("user", "erin", ("ml_engineer",), "team-a")
TTL = timedelta(minutes=5)


@dataclass(frozen=True)
class Served:
    """A running service: its short name, a plain channel to it, its secret store."""

    name: str
    channel: grpc.aio.Channel
    store: SecretStore
    data_dir: Path


@pytest.fixture(params=catalog.IMPLEMENTED)
async def service(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    name: str = request.param
    entry = catalog.load(name)
    # Policy is never reached: every call here fails authentication first.
    settings = entry.settings_class(
        data_dir=tmp_path,
        shutdown_grace=timedelta(0),
        auth=AuthSettings(mode="enforce", policy_addr="127.0.0.1:9"),
    )
    server: ConveyorServer = await entry.build_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Served(name, channel, settings.open_secret_store(), tmp_path)
    finally:
        await channel.close(None)
        await server.shutdown()


async def registered_services(channel: grpc.aio.Channel) -> list[str]:
    """The service names the server registers, asked through reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def one_request() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    replies = [reply async for reply in stub.ServerReflectionInfo(one_request())]
    return [s.name for s in replies[0].list_services_response.service]


def message_class(descriptor: Any) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


async def call_status(
    channel: grpc.aio.Channel, method: MethodDescriptor, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.AioRpcError | None:
    """Call ``method`` with an empty request; the error it failed with (None if it
    succeeded)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_class = message_class(method.input_type)
    response_class = message_class(method.output_type)
    serializer = request_class.SerializeToString
    deserializer = response_class.FromString

    async def requests() -> AsyncIterator[Message]:
        yield request_class()

    call: Any
    if method.client_streaming and method.server_streaming:
        call = channel.stream_stream(path, serializer, deserializer)(requests(), metadata=metadata)
    elif method.client_streaming:
        call = channel.stream_unary(path, serializer, deserializer)(requests(), metadata=metadata)
    elif method.server_streaming:
        call = channel.unary_stream(path, serializer, deserializer)(
            request_class(), metadata=metadata
        )
    else:
        call = channel.unary_unary(path, serializer, deserializer)(
            request_class(), metadata=metadata
        )
    try:
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error
    return None


def service_methods(names: list[str]) -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    services: list[ServiceDescriptor] = [
        pool.FindServiceByName(name) for name in names if name not in OPEN_SERVICES
    ]
    return [
        method
        for service in services
        for method in service.methods
        if method.full_name not in OPEN_METHODS
    ]


async def test_every_method_needs_valid_credentials(service: Served) -> None:
    names = await registered_services(service.channel)
    assert set(OPEN_SERVICES) <= set(names)
    methods = service_methods(names)
    assert methods, f"{service.name} registers no service of its own"

    issuer = TokenIssuer(service.store)
    foreign = TokenIssuer(LocalSecretStore(service.data_dir / "another-store"))
    credentials = {
        "none": (),
        "garbage": (("authorization", "Bearer not-a-jwt"),),
        "empty bearer": (("authorization", "Bearer "),),
        "basic": (("authorization", "Basic ZXJpbjpzZWNyZXQ="),),
        "expired": (
            (
                "authorization",
                "Bearer "
                + TokenIssuer(service.store, clock=lambda: time.time() - 3600).issue(
                    ERIN, [service.name], TTL
                ),
            ),
        ),
        "other audience": (
            ("authorization", "Bearer " + issuer.issue(ERIN, ["not-" + service.name], TTL)),
        ),
        "unknown key": (("authorization", "Bearer " + foreign.issue(ERIN, [service.name], TTL)),),
    }
    for method in methods:
        for label, metadata in credentials.items():
            error = await call_status(service.channel, method, metadata)
            assert error is not None, f"{method.full_name} with {label} credentials succeeded"
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (
                f"{method.full_name} with {label} credentials: {error.code()} {error.details()}"
            )
            assert isinstance(from_rpc_error(error), UnauthenticatedError)
            assert "not-a-jwt" not in (error.details() or "")


async def test_health_and_reflection_answer_without_credentials(service: Served) -> None:
    health = health_pb2_grpc.HealthStub(service.channel)
    overall = await health.Check(health_pb2.HealthCheckRequest())
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    names = await registered_services(service.channel)
    for name in names:
        if name not in OPEN_SERVICES:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    if "inference.GRPCInferenceService" in names:
        live = service.channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=lambda _: b"",
            response_deserializer=lambda data: data,
        )
        assert await live(b"") == b"\x08\x01"  # ServerLiveResponse(live=true)
