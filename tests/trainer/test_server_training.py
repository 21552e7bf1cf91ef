"""Real training through the trainer's API, each job in its own worker process,
with a registry beside the trainer: the breast-cancer MLP trains to 95% test
accuracy while watchers follow it, and its registered version carries the
weights (loadable with ``weights_only=True``), metrics, hyperparameters,
reference statistics, full lineage and the evaluation report; a running job
cancels within a step and registers nothing; a registry refusal fails the job."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer import datasets
from conveyor.services.trainer.evaluation import classification_metrics, predict_probabilities
from conveyor.services.trainer.registration import Registrar
from conveyor.services.trainer.splits import split_dataset
from conveyor.services.trainer.weights import load_model
from conveyor.shared.workers import WorkerThreads
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from tests.support.registry import create_model, download
from tests.support.trainer import (
    Running,
    breast_cancer_spec,
    create_job,
    event_types,
    get_job,
    job_request,
    refused,
    running_trainer,
    synthetic_spec,
    wait_until,
    watch,
)

TRAINING_TIMEOUT_S = 240


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer and the registry by themselves: no authentication, no gates."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Running]:
    async with running_trainer(tmp_path, max_running_jobs=1) as running:
        yield running


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_breast_cancer_trains_watched_and_registers_with_lineage(served: Running) -> None:
    trainer, registry = served.trainer, served.registry
    assert registry is not None
    await create_model(registry, "cancer")
    spec = breast_cancer_spec(model="models/cancer")
    spec.registration.description = "MLP on the Wisconsin set"
    spec.registration.labels["purpose"] = "test"
    job = await create_job(trainer, spec, "cancer-mlp")
    # Two watchers from the start (one allowing a progress event an hour), one late.
    eager = asyncio.create_task(
        watch(trainer, job.name, interval=timedelta(milliseconds=50), seconds=TRAINING_TIMEOUT_S)
    )
    sparse = asyncio.create_task(
        watch(trainer, job.name, interval=timedelta(hours=1), seconds=TRAINING_TIMEOUT_S)
    )
    events = await eager
    assert events[0].type == pb.TRAINING_JOB_EVENT_TYPE_SNAPSHOT
    assert events[-1].type == pb.TRAINING_JOB_EVENT_TYPE_STATE_CHANGED
    final = events[-1].training_job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    epochs = [e.epoch.epoch for e in events if e.type == pb.TRAINING_JOB_EVENT_TYPE_EPOCH_COMPLETED]
    assert epochs == list(range(1, 31))
    checkpoints = [
        e.checkpoint.epoch for e in events if e.type == pb.TRAINING_JOB_EVENT_TYPE_CHECKPOINT_SAVED
    ]
    assert checkpoints == list(range(1, 31))
    assert set(event_types(events)) <= {
        "SNAPSHOT",
        "STATE_CHANGED",
        "PROGRESS",
        "EPOCH_COMPLETED",
        "CHECKPOINT_SAVED",
    }
    steps = [e.progress.global_step for e in events if e.progress.global_step]
    assert steps == sorted(steps)
    few = await sparse
    assert event_types(few).count("PROGRESS") <= 1
    assert event_types(few).count("EPOCH_COMPLETED") == 30
    assert few[-1].training_job.state == pb.JOB_STATE_SUCCEEDED
    late = await watch(trainer, job.name)
    assert event_types(late) == ["SNAPSHOT"]
    assert late[0].training_job == await get_job(trainer, job.name)

    done = await get_job(trainer, job.name)
    result = done.result
    assert result.test_metrics["accuracy"] >= 0.95
    assert result.model_version == "models/cancer/versions/1"
    assert len(done.history) == 30
    assert done.checkpoint.epoch == 30
    assert done.progress.epoch == 30
    assert done.resume_count == 0
    builtin = datasets.load_builtin(datasets.BREAST_CANCER)
    assert done.dataset_digest == builtin.digest
    assert done.environment.device == "cpu" or done.environment.device.startswith("cuda")
    assert done.environment.torch_version == torch.__version__
    assert done.environment.code_revision
    assert done.HasField("start_time")
    assert done.HasField("end_time")
    ended = await refused(
        trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name=job.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert ended.reason == "TRAINING_JOB_ENDED"

    version = (
        await registry.GetModelVersion(
            registry_rpc.GetModelVersionRequest(name=result.model_version)
        )
    ).model_version
    assert version.format == registry_pb.MODEL_FORMAT_TORCH_STATE_DICT
    assert version.task == registry_pb.TASK_TYPE_BINARY_CLASSIFICATION
    assert version.created_by == "user:anonymous"  # the trainer, unauthenticated here
    assert list(version.authors) == ["user:anonymous"]
    assert version.description == "MLP on the Wisconsin set"
    assert dict(version.labels) == {"purpose": "test"}
    assert version.lineage == registry_pb.Lineage(
        training_job=job.name,
        dataset="datasets/breast-cancer",
        dataset_digest=builtin.digest,
        code_revision=done.environment.code_revision,
    )
    assert dict(version.metrics) == {
        **result.test_metrics,
        **{f"validation/{k}": v for k, v in result.validation_metrics.items()},
    }
    hyperparameters = dict(version.hyperparameters)
    assert hyperparameters["seed"] == "1"
    assert hyperparameters["split_seed"] == "7"
    assert hyperparameters["epochs"] == 30
    assert hyperparameters["learning_rate"] == 1e-3
    assert hyperparameters["optimizer"] == "ADAM"
    assert hyperparameters["dropout"] == 0.1
    assert version.architecture.name == "mlp"
    assert dict(version.architecture.args)["in_features"] == 30
    inputs, outputs = version.signature.inputs[0], version.signature.outputs[0]
    assert list(inputs.shape) == [-1, 30]
    assert len(inputs.feature_names) == 30
    assert list(outputs.class_names) == ["malignant", "benign"]
    statistics = version.reference_statistics
    assert statistics.dataset_digest == builtin.digest
    assert len(statistics.features) == 30
    assert len(statistics.predictions) == 2
    assert "breast-cancer" in version.model_card

    attachments = (
        await registry.ListAttachments(registry_rpc.ListAttachmentsRequest(parent=version.name))
    ).attachments
    assert [a.kind for a in attachments] == [registry_pb.ATTACHMENT_KIND_EVALUATION_REPORT]
    report = json.loads(
        (
            await registry.GetAttachment(
                registry_rpc.GetAttachmentRequest(name=attachments[0].name)
            )
        ).attachment.content
    )
    assert report["test_metrics"] == dict(sorted(result.test_metrics.items()))
    assert report["confusion_matrix"]["counts"] == list(result.confusion_matrix.counts)
    assert report["training_job"] == job.name

    _, weights = await download(registry, version.name)
    job_weights = (served.job_dir(job.name) / "weights.pt").read_bytes()
    assert version.artifact.sha256 == hashlib.sha256(job_weights).hexdigest()
    state = torch.load(io.BytesIO(weights), weights_only=True)
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    model = load_model(weights, version.architecture, (30,), 2)
    test = split_dataset(builtin, spec.data).test
    metrics = classification_metrics(
        np.asarray(test.labels), predict_probabilities(model, test.features)
    )
    assert metrics["accuracy"] == pytest.approx(result.test_metrics["accuracy"])

    # Registering again (a trainer restarted before it recorded the result) finds
    # the same version: the request ids come from the job.
    assert served.registry_server is not None
    threads = WorkerThreads(1, name="test-registrar")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.registry_server.port}") as channel:
        again = await Registrar(channel, threads).register(done, served.job_dir(job.name))
    await threads.shutdown()
    assert again == result.model_version
    versions = await registry.ListModelVersions(
        registry_rpc.ListModelVersionsRequest(parent="models/cancer")
    )
    assert len(versions.model_versions) == 1


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_a_running_job_cancels_within_a_step_and_registers_nothing(served: Running) -> None:
    trainer, registry = served.trainer, served.registry
    assert registry is not None
    await create_model(registry, "never")
    long = await create_job(trainer, breast_cancer_spec(epochs=5000, model="models/never"), "long")
    waiting = await create_job(trainer, breast_cancer_spec(), "waiting")
    running = await wait_until(
        trainer, long.name, lambda e: e.type == pb.TRAINING_JOB_EVENT_TYPE_EPOCH_COMPLETED
    )
    assert running.state == pb.JOB_STATE_RUNNING
    assert running.HasField("start_time")
    assert running.dataset_digest
    queued = await get_job(trainer, waiting.name)
    assert (queued.state, queued.queue_position) == (pb.JOB_STATE_QUEUED, 0)
    # The queued one is cancelled at once, without ever starting.
    cancelled = (
        await trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name=waiting.name))
    ).training_job
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert not cancelled.HasField("start_time")

    stream = asyncio.create_task(watch(trainer, long.name, seconds=TRAINING_TIMEOUT_S))
    asked = (
        await trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name=long.name))
    ).training_job
    assert (asked.state, asked.cancel_requested) == (pb.JOB_STATE_RUNNING, True)
    events = await stream
    assert events[-1].type == pb.TRAINING_JOB_EVENT_TYPE_STATE_CHANGED
    final = events[-1].training_job
    assert final.state == pb.JOB_STATE_CANCELLED
    assert final.cancel_requested
    assert not final.HasField("result")
    assert not final.HasField("error")
    assert final.HasField("end_time")
    total_steps = final.progress.steps_per_epoch * final.progress.total_epochs
    assert final.progress.global_step < total_steps
    # The worker stopped through the cancel path (after a step), not killed mid-way.
    log = (served.job_dir(long.name) / "worker.log").read_text()
    assert '"message": "cancelled"' in log
    assert not (served.job_dir(long.name) / "weights.pt").exists()
    versions = await registry.ListModelVersions(
        registry_rpc.ListModelVersionsRequest(parent="models/never")
    )
    assert list(versions.model_versions) == []
    assert (await get_job(trainer, waiting.name)).state == pb.JOB_STATE_CANCELLED


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_a_registry_refusal_fails_the_job(served: Running) -> None:
    trainer, registry = served.trainer, served.registry
    assert registry is not None
    await create_model(registry, "closing")
    job = await create_job(trainer, synthetic_spec(epochs=1, model="models/closing"))
    # Archived after the job was accepted: the registry refuses the version.
    await registry.ArchiveModel(registry_rpc.ArchiveModelRequest(name="models/closing"))
    events = await watch(trainer, job.name, seconds=TRAINING_TIMEOUT_S)
    final = events[-1].training_job
    assert final.state == pb.JOB_STATE_FAILED
    assert final.error.reason == "REGISTRATION_FAILED"
    assert final.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "models/closing" in final.error.message
    assert not final.HasField("result")
    again = await refused(
        trainer.CancelTrainingJob(rpc.CancelTrainingJobRequest(name=job.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert again.reason == "TRAINING_JOB_ENDED"
    refusal = await refused(
        trainer.CreateTrainingJob(job_request(synthetic_spec(epochs=1, model="models/closing"))),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert refusal.reason == "MODEL_ARCHIVED"


@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_a_job_past_its_max_run_duration_fails(served: Running) -> None:
    spec = synthetic_spec(epochs=1000)
    spec.max_run_duration.FromTimedelta(timedelta(milliseconds=1))
    job = await create_job(served.trainer, spec)
    events = await watch(served.trainer, job.name, seconds=TRAINING_TIMEOUT_S)
    final = events[-1].training_job
    assert final.state == pb.JOB_STATE_FAILED
    assert final.error.reason == "MAX_RUN_DURATION_EXCEEDED"
    assert final.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert not final.cancel_requested


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_on_a_gpu_a_job_trains_with_mixed_precision(served: Running) -> None:
    spec = breast_cancer_spec()
    spec.compute.device = pb.DEVICE_CUDA
    job = await create_job(served.trainer, spec)
    events = await watch(served.trainer, job.name, seconds=TRAINING_TIMEOUT_S)
    final = events[-1].training_job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.environment.device.startswith("cuda:")
    assert final.environment.accelerator
    assert final.environment.mixed_precision
    assert final.result.test_metrics["accuracy"] >= 0.9


@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT_S)
async def test_a_distributed_job_trains_in_two_processes(served: Running) -> None:
    spec = synthetic_spec(epochs=2)
    spec.compute.distributed.world_size = 2
    job = await create_job(served.trainer, spec)
    events = await watch(served.trainer, job.name, seconds=TRAINING_TIMEOUT_S)
    final = events[-1].training_job
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.environment.world_size == 2
    assert final.environment.backend == pb.DISTRIBUTED_BACKEND_GLOO
    assert [summary.epoch for summary in final.history] == [1, 2]
    assert "accuracy" in final.result.test_metrics
