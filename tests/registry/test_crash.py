"""The registry survives SIGKILL: a real `conveyor serve registry` process is
killed in the middle of an upload, or of a burst of version creations, and
restarted on the same data directory. The store is then consistent (SQLite's
integrity check, no orphan row, no partial blob visible), every acknowledged
version is there, numbered without gaps, and the cut-off upload succeeds when
sent again."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from conveyor.registry.v1 import registry_messages_pb2 as rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.services.registry.server import build_server
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.health import ServerExitedError, wait_until_serving
from tests.support.registry import CHUNK, a_version, create_model, create_version, download

if TYPE_CHECKING:
    Stub = registry_service_pb2_grpc.RegistryServiceAsyncStub

MIB = 1024 * 1024
STARTUP_TIMEOUT_S = 60.0


class RegistryProcesses:
    """Registry servers in child processes, all on one data directory; the
    ones still running at the end of the test are stopped."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.database = data_dir / "registry" / "registry.db"
        self.blobs = data_dir / "registry" / "blobs"
        self._children: list[subprocess.Popen[bytes]] = []

    def start(self) -> tuple[subprocess.Popen[bytes], str]:
        """Start `conveyor serve registry` and wait until it reports SERVING."""
        address = f"127.0.0.1:{_free_port()}"
        log = self.data_dir.parent / f"registry-{len(self._children)}.log"
        with log.open("wb") as output:
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "conveyor.services.cli",
                    "serve",
                    "registry",
                    "--listen",
                    address,
                    "--data-dir",
                    str(self.data_dir),
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._children.append(child)
        try:
            wait_until_serving(address, process=child, timeout_s=STARTUP_TIMEOUT_S)
        except (ServerExitedError, TimeoutError) as error:
            raise AssertionError(f"{error}: {log.read_text()[-4000:]}") from error
        return child, address

    def stop_all(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[RegistryProcesses]:
    started = RegistryProcesses(tmp_path / "data")
    yield started
    started.stop_all()


@asynccontextmanager
async def connected(address: str) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield registry_service_pb2_grpc.RegistryServiceStub(channel)


def kill(child: subprocess.Popen[bytes]) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


def integrity(database: Path) -> str:
    with sqlite3.connect(database) as db:
        result: str = db.execute("PRAGMA integrity_check").fetchone()[0]
    db.close()
    return result


def version_rows(database: Path, model_id: str) -> list[int]:
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT v.version FROM model_versions v JOIN models m ON m.id = v.model_pk "
            "WHERE m.model_id = ? ORDER BY v.version",
            (model_id,),
        ).fetchall()
    db.close()
    return [row[0] for row in rows]


def files_under(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


async def wait_for_partial_upload(tmp: Path, at_least: int) -> Path:
    """The upload's temporary file, once the server has written ``at_least`` bytes."""
    for _ in range(600):
        partial = await asyncio.to_thread(files_under, tmp)
        if partial and partial[0].stat().st_size >= at_least:
            return partial[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server never wrote {at_least} bytes of the upload")


@pytest.mark.slow
async def test_a_registry_killed_mid_upload_restarts_consistent(
    processes: RegistryProcesses,
) -> None:
    data = os.urandom(64 * MIB)
    digest = hashlib.sha256(data).hexdigest()
    metadata = rpc.CreateModelVersionRequest(
        metadata=rpc.CreateModelVersionMetadata(
            parent="models/big", model_version=a_version(), sha256=digest, size_bytes=len(data)
        )
    )
    first, address = await asyncio.to_thread(processes.start)
    async with connected(address) as registry:
        await create_model(registry, "big")
        upload = registry.CreateModelVersion(timeout=60)
        await upload.write(metadata)
        for start in range(0, 20 * CHUNK, CHUNK):  # each write waits for flow control
            await upload.write(rpc.CreateModelVersionRequest(chunk=data[start : start + CHUNK]))
        partial = await wait_for_partial_upload(processes.blobs / "tmp", at_least=8 * MIB)
        await asyncio.to_thread(kill, first)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await upload
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE

    # What the crash left: a consistent database without the version, and the
    # bytes received so far only in a temporary file no reader looks at.
    assert await asyncio.to_thread(integrity, processes.database) == "ok"
    assert await asyncio.to_thread(version_rows, processes.database, "big") == []
    assert 8 * MIB <= partial.stat().st_size < len(data)
    assert not list((processes.blobs / "sha256").rglob(f"{digest}*"))  # either form

    _, address = await asyncio.to_thread(processes.start)
    assert await asyncio.to_thread(files_under, processes.blobs / "tmp") == []
    assert await asyncio.to_thread(files_under, processes.blobs / "sha256") == []
    assert await asyncio.to_thread(integrity, processes.database) == "ok"
    async with connected(address) as registry:
        model = (await registry.GetModel(rpc.GetModelRequest(name="models/big"), timeout=10)).model
        assert model.latest_version == ""
        listed = await registry.ListModelVersions(
            rpc.ListModelVersionsRequest(parent="models/big"), timeout=10
        )
        assert list(listed.model_versions) == []

        version = await create_version(registry, "big", data)
        assert version.name == "models/big/versions/1"  # the lost upload took no number
        assert version.artifact.sha256 == digest
        _, downloaded = await download(registry, version.name)
        assert downloaded == data
    assert await asyncio.to_thread(version_rows, processes.database, "big") == [1]


@pytest.mark.slow
async def test_a_registry_killed_during_a_burst_keeps_every_acknowledged_version(
    processes: RegistryProcesses,
) -> None:
    clients, kill_after = 8, 40
    acknowledged: dict[str, bytes] = {}
    enough = asyncio.Event()
    first, address = await asyncio.to_thread(processes.start)
    async with connected(address) as registry:
        await create_model(registry, "burst")

        async def create_until_cut_off(client: int) -> grpc.StatusCode:
            for attempt in range(1000):
                content = f"client-{client}-attempt-{attempt}".encode()
                try:
                    version = await create_version(registry, "burst", content)
                except grpc.aio.AioRpcError as error:
                    return error.code()
                acknowledged[version.name] = content
                if len(acknowledged) >= kill_after:
                    enough.set()
            raise AssertionError("the registry was never killed")

        burst = [asyncio.create_task(create_until_cut_off(c)) for c in range(clients)]
        await enough.wait()
        await asyncio.to_thread(kill, first)
        assert await asyncio.gather(*burst) == [grpc.StatusCode.UNAVAILABLE] * clients

    assert await asyncio.to_thread(integrity, processes.database) == "ok"
    numbers = await asyncio.to_thread(version_rows, processes.database, "burst")
    # Numbered 1..N without gaps; at most one unacknowledged commit per client.
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(acknowledged) <= len(numbers) <= len(acknowledged) + clients

    _, address = await asyncio.to_thread(processes.start)
    async with connected(address) as registry:
        listed = await registry.ListModelVersions(
            rpc.ListModelVersionsRequest(parent="models/burst", page_size=1000), timeout=10
        )
        names = {v.name for v in listed.model_versions}
        assert names == {f"models/burst/versions/{n}" for n in numbers}
        for name, content in acknowledged.items():
            _, downloaded = await download(registry, name)
            assert downloaded == content, name
        after = await create_version(registry, "burst", b"after the restart")
        assert after.name == f"models/burst/versions/{len(numbers) + 1}"


async def test_a_second_registry_starting_on_the_same_data_spares_uploads_in_flight(
    registry_settings: RegistrySettings, registry: Stub
) -> None:
    data = os.urandom(4 * MIB)
    await create_model(registry, "shared")
    upload = registry.CreateModelVersion(timeout=30)
    await upload.write(
        rpc.CreateModelVersionRequest(
            metadata=rpc.CreateModelVersionMetadata(
                parent="models/shared",
                model_version=a_version(),
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
            )
        )
    )
    await upload.write(rpc.CreateModelVersionRequest(chunk=data[:CHUNK]))
    await wait_for_partial_upload(registry_settings.service_data_dir / "blobs" / "tmp", CHUNK)

    replica = await build_server(registry_settings)
    await replica.shutdown()

    for start in range(CHUNK, len(data), CHUNK):
        await upload.write(rpc.CreateModelVersionRequest(chunk=data[start : start + CHUNK]))
    await upload.done_writing()
    reply = await upload
    assert reply.model_version.name == "models/shared/versions/1"
    _, downloaded = await download(registry, reply.model_version.name)
    assert downloaded == data


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
