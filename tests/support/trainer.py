"""Helpers for the trainer server's tests: running servers, requests built the
way a client builds them, and reading watch streams."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.services.registry.server import build_server as build_registry
from conveyor.services.registry.settings import RegistrySettings
from conveyor.services.trainer.server import build_server as build_trainer
from conveyor.services.trainer.settings import TrainerSettings
from conveyor.shared.auth.principal import Principal
from conveyor.shared.auth.settings import AuthSettings
from conveyor.shared.channel import create_channel
from conveyor.shared.errors import ConveyorError, InvalidArgumentError, from_rpc_error
from conveyor.shared.server import ConveyorServer
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from conveyor.trainer.v1 import trainer_service_pb2_grpc
from tests.support.suite import Suite, running_suite
from tests.trainer.conftest import make_spec

if TYPE_CHECKING:
    from conveyor.registry.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub
    from conveyor.trainer.v1.trainer_service_pb2_grpc import TrainerServiceAsyncStub

CHUNK = 1024 * 1024
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


@dataclass
class Running:
    """A trainer (and, when asked, a registry) serving in this process."""

    trainer_server: ConveyorServer
    trainer: TrainerServiceAsyncStub
    registry_server: ConveyorServer | None
    registry: RegistryServiceAsyncStub | None
    data_dir: Path

    @property
    def trainer_target(self) -> str:
        return f"127.0.0.1:{self.trainer_server.port}"

    def job_dir(self, name: str) -> Path:
        return self.data_dir / "trainer" / "jobs" / name.removeprefix("trainingJobs/")


@asynccontextmanager
async def running_trainer(
    data_dir: Path, *, with_registry: bool = True, **settings: Any
) -> AsyncIterator[Running]:
    """A trainer with authentication off (the environment says so: see the
    tests' ``alone`` fixtures), with a registry beside it unless told not to."""
    registry_server = None
    if with_registry:
        registry_server = await build_registry(
            RegistrySettings(data_dir=data_dir, shutdown_grace=timedelta(seconds=1))
        )
        settings.setdefault("registry_addr", f"127.0.0.1:{registry_server.port}")
    trainer_server = await build_trainer(
        TrainerSettings(data_dir=data_dir, shutdown_grace=timedelta(seconds=1), **settings)
    )
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{trainer_server.port}")]
    registry = None
    if registry_server is not None:
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}"))
        registry = registry_service_pb2_grpc.RegistryServiceStub(channels[1])
    try:
        yield Running(
            trainer_server,
            trainer_service_pb2_grpc.TrainerServiceStub(channels[0]),
            registry_server,
            registry,
            data_dir,
        )
    finally:
        for channel in channels:
            await channel.close(None)
        await trainer_server.shutdown()
        if registry_server is not None:
            await registry_server.shutdown()


def breast_cancer_spec(
    *, epochs: int = 30, model: str = "", seed: int = 1, **hyperparameters: Any
) -> pb.TrainingJobSpec:
    """The breast-cancer MLP that reaches 95% test accuracy in 30 epochs, on the CPU."""
    hyperparameters.setdefault("dropout", 0.1)
    spec = make_spec(
        "datasets/breast-cancer",
        "mlp",
        {"hidden_sizes": [32, 16]},
        epochs=epochs,
        batch_size=32,
        learning_rate=1e-3,
        seed=seed,
        split_seed=7,
        **hyperparameters,
    )
    spec.compute.device = pb.DEVICE_CPU  # bit-reproducible, also where a GPU is present
    if model:
        spec.registration.model = model
    return spec


def synthetic_spec(
    *, epochs: int, num_samples: int = 400, batch_size: int = 32, model: str = ""
) -> pb.TrainingJobSpec:
    """An MLP on generated tabular data, on the CPU; more samples make longer epochs."""
    spec = make_spec(epochs=epochs, batch_size=batch_size, learning_rate=1e-3, seed=3)
    spec.data.generator_args.update(
        {"num_samples": num_samples, "num_features": 16, "num_classes": 2, "seed": 11}
    )
    spec.architecture.args.update({"hidden_sizes": [64, 64]})
    spec.compute.device = pb.DEVICE_CPU  # bit-reproducible, also where a GPU is present
    if model:
        spec.registration.model = model
    return spec


def job_request(
    spec: pb.TrainingJobSpec, job_id: str = "", **fields: Any
) -> rpc.CreateTrainingJobRequest:
    return rpc.CreateTrainingJobRequest(
        training_job_id=job_id, training_job=pb.TrainingJob(spec=spec), **fields
    )


async def create_job(
    trainer: TrainerServiceAsyncStub, spec: pb.TrainingJobSpec, job_id: str = "", **fields: Any
) -> pb.TrainingJob:
    reply = await trainer.CreateTrainingJob(job_request(spec, job_id, **fields), timeout=30)
    return reply.training_job


async def get_job(trainer: TrainerServiceAsyncStub, name: str) -> pb.TrainingJob:
    reply = await trainer.GetTrainingJob(rpc.GetTrainingJobRequest(name=name), timeout=30)
    return reply.training_job


async def watch(
    trainer: TrainerServiceAsyncStub,
    name: str,
    *,
    interval: timedelta = timedelta(0),
    seconds: float = 120,
) -> list[rpc.WatchTrainingJobResponse]:
    """Every event of a watch, until the server ends the stream."""
    request = rpc.WatchTrainingJobRequest(name=name)
    request.progress_interval.FromTimedelta(interval)
    return [event async for event in trainer.WatchTrainingJob(request, timeout=seconds)]


async def wait_until(
    trainer: TrainerServiceAsyncStub,
    name: str,
    until: Any,
    *,
    seconds: float = 120,
) -> pb.TrainingJob:
    """The job once an event of its watch stream satisfies ``until(event)``
    (the stream's snapshot included); fails if the stream ends first."""
    request = rpc.WatchTrainingJobRequest(name=name)
    request.progress_interval.FromTimedelta(timedelta(milliseconds=50))
    call = trainer.WatchTrainingJob(request, timeout=seconds)
    try:
        async for event in call:
            if until(event):
                return await get_job(trainer, name)
    finally:
        call.cancel()
    raise AssertionError(f"the watch of {name} ended before the condition held")


def npz_bytes(features: npt.ArrayLike, labels: npt.ArrayLike) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.asarray(features), y=np.asarray(labels))
    return buffer.getvalue()


def csv_bytes(rows: Iterable[Iterable[object]], header: Iterable[str]) -> bytes:
    lines = [",".join(header), *(",".join(str(v) for v in row) for row in rows)]
    return ("\n".join(lines) + "\n").encode()


async def upload_requests(
    dataset_id: str,
    data: bytes,
    *,
    dataset: pb.Dataset | None = None,
    sha256: str | None = None,
    size_bytes: int | None = None,
    request_id: str = "",
    chunk: int = CHUNK,
) -> AsyncIterator[rpc.CreateDatasetRequest]:
    yield rpc.CreateDatasetRequest(
        metadata=rpc.CreateDatasetMetadata(
            dataset_id=dataset_id,
            dataset=dataset or pb.Dataset(format=pb.DATASET_FORMAT_NPZ),
            sha256=sha256 or hashlib.sha256(data).hexdigest(),
            size_bytes=len(data) if size_bytes is None else size_bytes,
            request_id=request_id,
        )
    )
    for start in range(0, len(data), chunk):
        yield rpc.CreateDatasetRequest(chunk=data[start : start + chunk])


def event_types(events: Iterable[rpc.WatchTrainingJobResponse]) -> list[str]:
    return [
        pb.TrainingJobEventType.Name(e.type).removeprefix("TRAINING_JOB_EVENT_TYPE_")
        for e in events
    ]


async def refused(call: Any, code: grpc.StatusCode) -> ConveyorError:
    """The error a call fails with, after checking its status code."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, (raised.value.code(), raised.value.details())
    return from_rpc_error(raised.value)


async def invalid(call: Any, *fields: str) -> InvalidArgumentError:
    """The INVALID_ARGUMENT a call fails with; its field violations name
    exactly ``fields`` (in any order, each at least once)."""
    error = await refused(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert isinstance(error, InvalidArgumentError)
    assert sorted({v.field for v in error.violations}) == sorted(set(fields)), error.violations
    return error


@asynccontextmanager
async def running_suite_with_trainer(data_dir: Path) -> AsyncIterator[tuple[Suite, ConveyorServer]]:
    """:func:`tests.support.suite.running_suite` (registry and policy, both
    authenticating every call) with a trainer beside them that does too, and
    registers in that registry as ``service:trainer``."""
    async with running_suite(data_dir) as suite:
        trainer_server = await build_trainer(
            TrainerSettings(
                data_dir=data_dir,
                auth=AuthSettings(mode="enforce", policy_addr=suite.policy_target),
                registry_addr=suite.registry_target,
                shutdown_grace=timedelta(seconds=1),
            ),
            secret_store=suite.secret_store,
        )
        try:
            yield suite, trainer_server
        finally:
            await trainer_server.shutdown()


def trainer_as(
    suite: Suite, server: ConveyorServer, principal: Principal | None
) -> TrainerServiceAsyncStub:
    """A trainer stub calling as ``principal`` (None: no credentials); the
    suite closes its channel."""
    token = suite.token(principal, ("trainer",)) if principal is not None else None
    channel = create_channel(
        f"127.0.0.1:{server.port}", bearer_token=token, default_timeout=timedelta(seconds=60)
    )
    suite._channels.append(channel)
    return trainer_service_pb2_grpc.TrainerServiceStub(channel)
