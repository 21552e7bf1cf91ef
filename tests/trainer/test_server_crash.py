"""The trainer survives SIGKILL: a real ``conveyor serve trainer`` process is
killed while a job trains; its worker dies with it. Restarted on the same data
directory, the trainer resumes the job from its last checkpoint, and the job
ends with the same weights as an uninterrupted run of the same spec, registered
once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.services.registry.server import build_server as build_registry
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.health import ServerExitedError, wait_until_serving
from conveyor.shared.server import ConveyorServer
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_service_pb2_grpc
from tests.support.registry import create_model
from tests.support.trainer import create_job, synthetic_spec, wait_until, watch

STARTUP_TIMEOUT_S = 90.0
TEST_TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """No authentication, no promotion gates (the child processes inherit this)."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TrainerProcesses:
    """``conveyor serve trainer`` in child processes on one data directory; the
    ones still running at the end are stopped."""

    def __init__(self, data_dir: Path, registry_addr: str) -> None:
        self.data_dir = data_dir
        self.registry_addr = registry_addr
        self._children: list[subprocess.Popen[bytes]] = []

    def start(self) -> tuple[subprocess.Popen[bytes], str]:
        address = f"127.0.0.1:{_free_port()}"
        log = self.data_dir.parent / f"trainer-{len(self._children)}.log"
        command = [sys.executable, "-m", "conveyor.services.cli", "serve", "trainer"]
        with log.open("wb") as output:
            child = subprocess.Popen(
                [*command, "--listen", address, "--data-dir", str(self.data_dir)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "CONVEYOR_REGISTRY_ADDR": self.registry_addr,
                    "CONVEYOR_TRAINER_MAX_RUNNING_JOBS": "2",
                },
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
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[ConveyorServer]:
    server = await build_registry(
        RegistrySettings(data_dir=tmp_path / "registry", shutdown_grace=timedelta(seconds=1))
    )
    yield server
    await server.shutdown()


@pytest.fixture
def processes(tmp_path: Path, registry: ConveyorServer) -> Iterator[TrainerProcesses]:
    started = TrainerProcesses(tmp_path / "data", f"127.0.0.1:{registry.port}")
    yield started
    started.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_a_killed_trainer_resumes_its_job_from_the_checkpoint(
    processes: TrainerProcesses, registry: ConveyorServer
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        registry_stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        await create_model(registry_stub, "resumed")
        spec = synthetic_spec(epochs=5, num_samples=3000, model="models/resumed")

        first, address = await asyncio.to_thread(processes.start)
        async with grpc.aio.insecure_channel(address) as trainer_channel:
            trainer = trainer_service_pb2_grpc.TrainerServiceStub(trainer_channel)
            job = await create_job(trainer, spec, "interrupted")
            await wait_until(
                trainer,
                job.name,
                lambda e: e.type == pb.TRAINING_JOB_EVENT_TYPE_CHECKPOINT_SAVED,
                seconds=TEST_TIMEOUT_S,
            )
            first.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(first.wait, 30) == -signal.SIGKILL

        job_dir = processes.data_dir / "trainer" / "jobs" / "interrupted"
        assert (job_dir / "checkpoint.pt").exists()
        assert not (job_dir / "result.binpb").exists()

        _, address = await asyncio.to_thread(processes.start)
        async with grpc.aio.insecure_channel(address) as trainer_channel:
            trainer = trainer_service_pb2_grpc.TrainerServiceStub(trainer_channel)
            # The same spec again, never interrupted, beside the resumed job.
            straight = await create_job(trainer, spec, "uninterrupted")
            events, straight_events = await asyncio.gather(
                watch(trainer, job.name, seconds=TEST_TIMEOUT_S),
                watch(trainer, straight.name, seconds=TEST_TIMEOUT_S),
            )
            resumed = events[-1].training_job
            assert resumed.state == pb.JOB_STATE_SUCCEEDED, resumed.error
            assert resumed.resume_count == 1
            assert [summary.epoch for summary in resumed.history] == [1, 2, 3, 4, 5]
            # Training went on from the checkpoint (the resumed worker can finish
            # before a watcher connects, so its log says so, not the stream).
            lines = (job_dir / "worker.log").read_text().splitlines()
            records = [json.loads(line) for line in lines if line.startswith("{")]
            resumed_from = [
                record["resumed_from_epoch"]
                for record in records
                if record.get("message") == "trained on from a checkpoint"
            ]
            assert len(resumed_from) == 1
            assert resumed_from[0] >= 1
            uninterrupted = straight_events[-1].training_job
            assert uninterrupted.state == pb.JOB_STATE_SUCCEEDED, uninterrupted.error
            assert uninterrupted.resume_count == 0

        assert resumed.result.test_metrics == uninterrupted.result.test_metrics
        weights = [
            hashlib.sha256(
                (processes.data_dir / "trainer" / "jobs" / j / "weights.pt").read_bytes()
            )
            for j in ("interrupted", "uninterrupted")
        ]
        assert weights[0].hexdigest() == weights[1].hexdigest()
        versions = (
            await registry_stub.ListModelVersions(
                registry_rpc.ListModelVersionsRequest(parent="models/resumed")
            )
        ).model_versions
        assert len(versions) == 2  # the resumed job registered once
        registered = {v.lineage.training_job: v for v in versions}
        assert sorted(registered) == ["trainingJobs/interrupted", "trainingJobs/uninterrupted"]
        assert registered["trainingJobs/interrupted"].name == resumed.result.model_version
        assert {v.artifact.sha256 for v in versions} == {weights[0].hexdigest()}
