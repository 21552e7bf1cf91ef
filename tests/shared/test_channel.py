"""Client channels: idempotent calls are retried, the rest are not."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from conveyor.registry.v1 import registry_messages_pb2 as messages
from conveyor.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as resources
from conveyor.shared.channel import create_channel, retry_service_config
from conveyor.shared.errors import UnavailableError
from conveyor.shared.server import ConveyorServer, ServiceRegistration, create_server
from tests.support.settings import TestServerSettings

REGISTRY = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]


class FlakyRegistry(registry_service_pb2_grpc.RegistryServiceServicer):
    """Answers UNAVAILABLE to the first call of each method, then succeeds."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def _flaky(self, method: str) -> None:
        self.calls[method] += 1
        if self.calls[method] == 1:
            raise UnavailableError("warming up")

    async def GetModel(self, request: messages.GetModelRequest, context: Any) -> Any:
        await self._flaky("GetModel")
        return messages.GetModelResponse(model=resources.Model(name=request.name))

    async def CreateModel(self, request: messages.CreateModelRequest, context: Any) -> Any:
        await self._flaky("CreateModel")
        return messages.CreateModelResponse(model=resources.Model(name="models/new"))


@pytest.fixture
async def flaky(tmp_path: Path) -> AsyncIterator[tuple[ConveyorServer, FlakyRegistry]]:
    servicer = FlakyRegistry()
    server = await create_server(
        TestServerSettings(data_dir=tmp_path),
        [
            ServiceRegistration(
                REGISTRY.full_name,
                lambda s: registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(
                    servicer, s
                ),
            )
        ],
    )
    yield server, servicer
    await server.server.stop(None)


def test_service_config_names_only_idempotent_methods() -> None:
    config = json.loads(retry_service_config([REGISTRY]))
    (method_config,) = config["methodConfig"]
    retried = {entry["method"] for entry in method_config["name"]}
    assert {"GetModel", "ListModels", "WatchAliases", "DownloadArtifact", "SetAlias"} <= retried
    assert not retried & {"CreateModel", "CreateModelVersion", "UpdateModel", "DeleteAlias"}
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


async def test_idempotent_call_is_retried_and_others_are_not(
    flaky: tuple[ConveyorServer, FlakyRegistry],
) -> None:
    server, servicer = flaky
    async with create_channel(f"127.0.0.1:{server.port}", services=[REGISTRY]) as channel:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        reply = await stub.GetModel(messages.GetModelRequest(name="models/churn"))
        assert reply.model.name == "models/churn"
        assert servicer.calls["GetModel"] == 2

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateModel(messages.CreateModelRequest(model_id="new"))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert servicer.calls["CreateModel"] == 1
