"""Registry servers for the tests: one per test, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.server import ConveyorServer
from tests.support.postgres import ThrowawayPostgres


@pytest.fixture(autouse=True)
def registry_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests exercise the registry by itself: no authentication and no
    promotion gates (tests/auth and tests/policy run it with both)."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


@pytest.fixture(scope="session")
def postgres() -> Iterator[ThrowawayPostgres]:
    cluster = ThrowawayPostgres()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_settings(request: pytest.FixtureRequest, tmp_path: Path) -> RegistrySettings:
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").create_database()
    return RegistrySettings(data_dir=tmp_path, database_url=url)


@pytest.fixture
async def registry_server(registry_settings: RegistrySettings) -> AsyncIterator[ConveyorServer]:
    server = await build_server(registry_settings)
    yield server
    await server.shutdown()


@pytest.fixture
async def registry(
    registry_server: ConveyorServer,
) -> AsyncIterator[registry_service_pb2_grpc.RegistryServiceAsyncStub]:
    options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{registry_server.port}", options=options
    ) as channel:
        yield registry_service_pb2_grpc.RegistryServiceStub(channel)
