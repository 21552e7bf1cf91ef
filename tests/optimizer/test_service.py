"""The optimizer end to end over gRPC, beside a real registry: the trained
breast-cancer MLP is registered, optimised by a job that is watched to its
end, and each result is found in the registry with its lineage, its format
and its report attached; its accuracy is recomputed here from the
registered ONNX file. A result the gate refuses is kept with its report and
registers nothing. Every RPC's bad inputs are refused before a job exists,
and the service stays healthy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from conveyor.optimizer.v1 import optimizer_messages_pb2 as rpc
from conveyor.optimizer.v1 import optimizer_service_pb2_grpc
from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import registry_messages_pb2 as registry_rpc
from conveyor.registry.v1 import registry_service_pb2_grpc
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.optimizer import runtime
from conveyor.services.optimizer.server import build_server as build_optimizer
from conveyor.services.optimizer.settings import OptimizerSettings
from conveyor.services.optimizer.source import load_splits
from conveyor.services.registry.server import build_server as build_registry
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.errors import FailedPreconditionError, InvalidArgumentError
from conveyor.shared.health import serving_status
from conveyor.shared.server import ConveyorServer
from tests.support.registry import create_model, download, refused, upload_requests
from tests.support.trained import Trained

TEST_TIMEOUT_S = 300
QUICK = pb.MeasurementConfig(batch_sizes=[1, 32], warmup_runs=2, timed_runs=20)
# Timing decides latency checks; these tests judge on accuracy and parity only.
TIMING_BLIND = pb.OptimizationGate(latency_tolerance=1000.0)


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer and the registry by themselves: no authentication, no gates."""
    monkeypatch.setenv("CONVEYOR_AUTH_MODE", "off")
    monkeypatch.setenv("CONVEYOR_REGISTRY_PROMOTION_GATE", "off")


@dataclass
class Served:
    optimizer_server: ConveyorServer
    optimizer: Any
    registry: Any
    source: str
    """The registered MLP: ``models/mlp/versions/1``."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.optimizer_server.port}"


async def register_source(registry: Any, trained: Trained, model_id: str) -> str:
    """Register ``trained`` as the registry holds a trainer's version."""
    await create_model(registry, model_id)
    version = registry_pb.ModelVersion()
    version.CopyFrom(trained.source.version)
    version.ClearField("name")
    reply = await registry.CreateModelVersion(
        upload_requests(f"models/{model_id}", trained.source.artifact, version=version),
        timeout=60,
    )
    return str(reply.model_version.name)


async def serving(tmp_path: Path, mlp: Trained, **settings: Any) -> AsyncIterator[Served]:
    registry_server = await build_registry(
        RegistrySettings(data_dir=tmp_path, shutdown_grace=timedelta(seconds=1))
    )
    optimizer_server = await build_optimizer(
        OptimizerSettings(
            data_dir=tmp_path,
            shutdown_grace=timedelta(seconds=1),
            registry_addr=f"127.0.0.1:{registry_server.port}",
            **settings,
        )
    )
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{optimizer_server.port}"),
        grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}"),
    ]
    registry = registry_service_pb2_grpc.RegistryServiceStub(channels[1])
    try:
        source = await register_source(registry, mlp, "mlp")
        yield Served(
            optimizer_server,
            optimizer_service_pb2_grpc.OptimizerServiceStub(channels[0]),
            registry,
            source,
        )
    finally:
        for channel in channels:
            await channel.close(None)
        await optimizer_server.shutdown()
        await registry_server.shutdown()


@pytest.fixture
async def served(tmp_path: Path, mlp: Trained) -> AsyncIterator[Served]:
    async for running in serving(tmp_path, mlp):
        yield running


@pytest.fixture
async def paused(tmp_path: Path, mlp: Trained) -> AsyncIterator[Served]:
    """An optimizer that queues jobs without starting any."""
    async for running in serving(tmp_path, mlp, max_running_jobs=0, max_queued_jobs=2):
        yield running


def job(source: str, *techniques: pb.TechniqueSpec, **fields: Any) -> pb.OptimizationJob:
    fields.setdefault("gate", TIMING_BLIND)
    fields.setdefault("measurement", QUICK)
    return pb.OptimizationJob(source_model_version=source, techniques=techniques, **fields)


async def create(served: Served, optimization_job: pb.OptimizationJob, **fields: Any) -> Any:
    request = rpc.CreateOptimizationJobRequest(optimization_job=optimization_job, **fields)
    return (await served.optimizer.CreateOptimizationJob(request, timeout=60)).optimization_job


async def watch(served: Served, name: str) -> list[pb.OptimizationJob]:
    request = rpc.WatchOptimizationJobRequest(name=name)
    return [
        update.optimization_job
        async for update in served.optimizer.WatchOptimizationJob(request, timeout=TEST_TIMEOUT_S)
    ]


async def versions_of(served: Served, model: str) -> list[str]:
    reply = await served.registry.ListModelVersions(
        registry_rpc.ListModelVersionsRequest(parent=model), timeout=30
    )
    return [version.name for version in reply.model_versions]


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_a_job_registers_each_passed_result_with_lineage_and_report(
    served: Served, mlp: Trained
) -> None:
    created = await create(
        served,
        job(
            served.source,
            pb.TechniqueSpec(onnx_export=pb.OnnxExportOptions()),
            pb.TechniqueSpec(static_int8=pb.StaticInt8Options()),
            pb.TechniqueSpec(dynamic_int8=pb.DynamicInt8Options(), result_id="dyn"),
        ),
        optimization_job_id="mlp-int8",
        request_id="c0ffee00-0000-4000-8000-000000000001",
    )
    assert (created.name, created.state) == (
        "optimizationJobs/mlp-int8",
        pb.OPTIMIZATION_JOB_STATE_QUEUED,
    )
    assert created.resolved_source_model_version == "models/mlp/versions/1"
    assert [r.result_id for r in created.results] == ["onnx-export", "static-int8", "dyn"]
    assert {r.state for r in created.results} == {pb.TECHNIQUE_STATE_PENDING}

    updates = await watch(served, created.name)
    final = updates[-1]
    assert final.state == pb.OPTIMIZATION_JOB_STATE_SUCCEEDED, final.error
    # Updates are coalesced to a few per second: some show the work under way.
    assert any(u.state == pb.OPTIMIZATION_JOB_STATE_RUNNING and u.progress.message for u in updates)
    assert [r.state for r in final.results] == [pb.TECHNIQUE_STATE_SUCCEEDED] * 3
    assert final.progress.fraction_complete == 1.0
    # The same request again is the same job.
    again = await create(
        served,
        job(
            served.source,
            pb.TechniqueSpec(onnx_export=pb.OnnxExportOptions()),
            pb.TechniqueSpec(static_int8=pb.StaticInt8Options()),
            pb.TechniqueSpec(dynamic_int8=pb.DynamicInt8Options(), result_id="dyn"),
        ),
        optimization_job_id="mlp-int8",
        request_id="c0ffee00-0000-4000-8000-000000000001",
    )
    assert again.name == created.name

    splits = load_splits(mlp.source.version)
    features = np.asarray(splits.test.features, dtype=np.float32)
    labels = np.asarray(splits.test.labels)
    formats = {
        "onnx-export": (registry_pb.MODEL_FORMAT_ONNX_FP32, "onnx_export"),
        "static-int8": (registry_pb.MODEL_FORMAT_ONNX_INT8_STATIC, "int8_static"),
        "dyn": (registry_pb.MODEL_FORMAT_ONNX_INT8_DYNAMIC, "int8_dynamic"),
    }
    for result in final.results:
        version = (
            await served.registry.GetModelVersion(
                registry_rpc.GetModelVersionRequest(
                    name=result.model_version, view=registry_pb.MODEL_VERSION_VIEW_FULL
                )
            )
        ).model_version
        expected_format, transformation = formats[result.result_id]
        assert version.format == expected_format
        assert version.lineage.parent_version == served.source
        assert version.lineage.transformation == transformation
        assert version.lineage.optimization_job == created.name
        assert version.signature == mlp.source.version.signature
        # Accuracy recomputed here from the registered file alone.
        _, data = await download(served.registry, version.name)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        outputs = np.asarray(session.run(None, {"input": features})[0])
        accuracy = float(np.mean(outputs.argmax(axis=1) == labels))
        assert result.report.candidate.metrics["accuracy"] == pytest.approx(accuracy)
        assert version.metrics["accuracy"] == pytest.approx(accuracy)
        attachments = await served.registry.ListAttachments(
            registry_rpc.ListAttachmentsRequest(parent=version.name)
        )
        [attachment] = attachments.attachments
        assert attachment.kind == registry_pb.ATTACHMENT_KIND_OPTIMIZATION_REPORT
        report = (
            await served.optimizer.GetOptimizationReport(
                rpc.GetOptimizationReportRequest(name=f"{created.name}/reports/{result.result_id}")
            )
        ).report
        assert report.model_version == version.name
        assert report == result.report
    [export] = [r for r in final.results if r.result_id == "onnx-export"]
    assert export.report.parity.max_abs_error <= 1e-4
    assert export.report.baseline.runtime == pb.RUNTIME_PYTORCH
    # A watch of an ended job is its one last state.
    assert [u.state for u in await watch(served, created.name)] == [final.state]


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_a_refused_result_is_kept_with_its_report_and_registers_nothing(
    served: Served,
) -> None:
    before = await versions_of(served, "models/mlp")
    strict = pb.OptimizationGate(latency_tolerance=1000.0, max_accuracy_drop_points=0.0)
    pruning = pb.PruningOptions(method=pb.PRUNING_METHOD_STRUCTURED, amount=0.95)
    created = await create(
        served, job(served.source, pb.TechniqueSpec(pruning=pruning), gate=strict)
    )
    final = (await watch(served, created.name))[-1]
    assert final.state == pb.OPTIMIZATION_JOB_STATE_SUCCEEDED
    [result] = final.results
    assert result.state == pb.TECHNIQUE_STATE_GATE_REFUSED
    assert not result.model_version
    assert (result.error.code, result.error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        "OPTIMIZATION_GATE_REFUSED",
    )
    assert "accuracy" in result.error.message
    assert not result.report.gate.passed
    assert await versions_of(served, "models/mlp") == before


async def test_jobs_are_listed_cancelled_and_read(paused: Served) -> None:
    first = await create(
        paused, job(paused.source, pb.TechniqueSpec(fp16=pb.Fp16Options())), optimization_job_id="a"
    )
    await create(
        paused, job(paused.source, pb.TechniqueSpec(fp16=pb.Fp16Options())), optimization_job_id="b"
    )
    full = await refused(
        paused.optimizer.CreateOptimizationJob(
            rpc.CreateOptimizationJobRequest(
                optimization_job=job(paused.source, pb.TechniqueSpec(fp16=pb.Fp16Options()))
            )
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert full.reason == "QUEUE_FULL"
    listed = await paused.optimizer.ListOptimizationJobs(rpc.ListOptimizationJobsRequest())
    assert [j.name for j in listed.optimization_jobs] == [
        "optimizationJobs/b",
        "optimizationJobs/a",
    ]
    page = await paused.optimizer.ListOptimizationJobs(
        rpc.ListOptimizationJobsRequest(page_size=1, order_by="create_time asc")
    )
    assert [j.name for j in page.optimization_jobs] == ["optimizationJobs/a"]
    rest = await paused.optimizer.ListOptimizationJobs(
        rpc.ListOptimizationJobsRequest(
            page_size=1, order_by="create_time asc", page_token=page.next_page_token
        )
    )
    assert [j.name for j in rest.optimization_jobs] == ["optimizationJobs/b"]
    cancelled = (
        await paused.optimizer.CancelOptimizationJob(
            rpc.CancelOptimizationJobRequest(name=first.name)
        )
    ).optimization_job
    assert cancelled.state == pb.OPTIMIZATION_JOB_STATE_CANCELLED
    assert [r.state for r in cancelled.results] == [pb.TECHNIQUE_STATE_CANCELLED]
    ended = await refused(
        paused.optimizer.CancelOptimizationJob(rpc.CancelOptimizationJobRequest(name=first.name)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert ended.reason == "OPTIMIZATION_JOB_ENDED"
    queued = await paused.optimizer.ListOptimizationJobs(
        rpc.ListOptimizationJobsRequest(filter="state = QUEUED")
    )
    assert [j.name for j in queued.optimization_jobs] == ["optimizationJobs/b"]
    by_source = await paused.optimizer.ListOptimizationJobs(
        rpc.ListOptimizationJobsRequest(
            filter='resolved_source_model_version = "models/mlp/versions/1"'
        )
    )
    assert len(by_source.optimization_jobs) == 2
    got = (
        await paused.optimizer.GetOptimizationJob(rpc.GetOptimizationJobRequest(name=first.name))
    ).optimization_job
    assert got == cancelled
    not_measured = await refused(
        paused.optimizer.GetOptimizationReport(
            rpc.GetOptimizationReportRequest(name="optimizationJobs/b/reports/fp16")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert not_measured.reason == "REPORT_NOT_FOUND"


async def test_bad_requests_are_refused_before_a_job_exists(paused: Served, mlp: Trained) -> None:
    optimizer = paused.optimizer

    async def refused_job(
        optimization_job: pb.OptimizationJob, code: grpc.StatusCode, **f: Any
    ) -> Any:
        request = rpc.CreateOptimizationJobRequest(optimization_job=optimization_job, **f)
        return await refused(optimizer.CreateOptimizationJob(request), code)

    source = paused.source
    unknown = await refused_job(job(source, pb.TechniqueSpec()), grpc.StatusCode.INVALID_ARGUMENT)
    assert isinstance(unknown, InvalidArgumentError)
    assert [v.field for v in unknown.violations] == ["optimization_job.techniques[0]"]
    bad = await refused_job(
        job(
            "models/mlp/versions/x",
            pb.TechniqueSpec(pruning=pb.PruningOptions(amount=1.5, fine_tune_epochs=99)),
            pb.TechniqueSpec(fp16=pb.Fp16Options(), result_id="Bad Id"),
            measurement=pb.MeasurementConfig(batch_sizes=[1, 1, 4096]),
            gate=pb.OptimizationGate(max_accuracy_drop_points=-1),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert isinstance(bad, InvalidArgumentError)
    assert {v.field for v in bad.violations} == {
        "optimization_job.source_model_version",
        "optimization_job.techniques[0].pruning.method",
        "optimization_job.techniques[0].pruning.amount",
        "optimization_job.techniques[0].pruning.fine_tune_epochs",
        "optimization_job.techniques[1].result_id",
        "optimization_job.measurement.batch_sizes",
        "optimization_job.gate.max_accuracy_drop_points",
    }
    twice = await refused_job(
        job(
            source,
            pb.TechniqueSpec(fp16=pb.Fp16Options(), result_id="same"),
            pb.TechniqueSpec(onnx_export=pb.OnnxExportOptions(), result_id="same"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert isinstance(twice, InvalidArgumentError)
    assert [v.field for v in twice.violations] == ["optimization_job.techniques[1].result_id"]
    await refused_job(
        job("models/nowhere/versions/1", pb.TechniqueSpec(fp16=pb.Fp16Options())),
        grpc.StatusCode.NOT_FOUND,
    )
    # Calibration data whose examples do not fit the model's input.
    shape = await refused_job(
        job(
            source, pb.TechniqueSpec(static_int8=pb.StaticInt8Options()), dataset="datasets/digits"
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert shape.reason == "DATASET_SHAPE_MISMATCH"
    # A PyTorch-only step on a model that is already ONNX.
    onnx_version = registry_pb.ModelVersion()
    onnx_version.CopyFrom(mlp.source.version)
    onnx_version.ClearField("name")
    onnx_version.ClearField("architecture")
    onnx_version.format = registry_pb.MODEL_FORMAT_ONNX_FP32
    reply = await paused.registry.CreateModelVersion(
        upload_requests("models/mlp", b"not really onnx", version=onnx_version), timeout=60
    )
    pruning = pb.PruningOptions(method=pb.PRUNING_METHOD_UNSTRUCTURED, amount=0.5)
    not_pytorch = await refused_job(
        job(reply.model_version.name, pb.TechniqueSpec(pruning=pruning)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert isinstance(not_pytorch, FailedPreconditionError)
    assert not_pytorch.reason == "TECHNIQUE_NOT_APPLICABLE"
    if not runtime.gpu_present():
        no_gpu = await refused_job(
            job(
                source,
                pb.TechniqueSpec(fp16=pb.Fp16Options()),
                measurement=pb.MeasurementConfig(execution_provider=pb.EXECUTION_PROVIDER_CUDA),
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert no_gpu.reason == "NO_GPU"
    await refused_job(
        job(source, pb.TechniqueSpec(fp16=pb.Fp16Options())),
        grpc.StatusCode.INVALID_ARGUMENT,
        optimization_job_id="Not_An_Id",
    )
    gone = "optimizationJobs/none"
    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    for call, code in (
        (optimizer.GetOptimizationJob(rpc.GetOptimizationJobRequest(name="jobs/x")), invalid),
        (optimizer.GetOptimizationJob(rpc.GetOptimizationJobRequest(name=gone)), not_found),
        (
            optimizer.CancelOptimizationJob(rpc.CancelOptimizationJobRequest(name=gone)),
            not_found,
        ),
        (optimizer.GetOptimizationReport(rpc.GetOptimizationReportRequest(name="x")), invalid),
        (optimizer.ListOptimizationJobs(rpc.ListOptimizationJobsRequest(filter="a = B")), invalid),
        (optimizer.ListOptimizationJobs(rpc.ListOptimizationJobsRequest(order_by="name")), invalid),
    ):
        await refused(call, code)

    async def watch_missing() -> None:
        request = rpc.WatchOptimizationJobRequest(name="optimizationJobs/none")
        async for _ in optimizer.WatchOptimizationJob(request, timeout=30):
            pass

    await refused(watch_missing(), grpc.StatusCode.NOT_FOUND)
    listed = await optimizer.ListOptimizationJobs(rpc.ListOptimizationJobsRequest())
    assert list(listed.optimization_jobs) == []
    assert await asyncio.to_thread(serving_status, paused.target) == "SERVING"


async def wait_for_state(served: Served, name: str, state: int) -> pb.OptimizationJob:
    """The job once a watch update shows ``state``."""
    request = rpc.WatchOptimizationJobRequest(name=name)
    call = served.optimizer.WatchOptimizationJob(request, timeout=TEST_TIMEOUT_S)
    try:
        async for update in call:
            if update.optimization_job.state == state:
                return update.optimization_job
    finally:
        call.cancel()
    raise AssertionError(f"{name} ended without reaching state {state}")


# Enough timed runs of the MLP that the job is still measuring when cancelled.
SLOW = pb.MeasurementConfig(batch_sizes=[1, 32], warmup_runs=2, timed_runs=100_000)


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_a_running_job_cancels_at_its_next_step(served: Served) -> None:
    before = await versions_of(served, "models/mlp")
    created = await create(
        served,
        job(
            served.source,
            pb.TechniqueSpec(fp16=pb.Fp16Options()),
            pb.TechniqueSpec(dynamic_int8=pb.DynamicInt8Options()),
            measurement=SLOW,
        ),
    )
    await wait_for_state(served, created.name, pb.OPTIMIZATION_JOB_STATE_RUNNING)
    cancelling = (
        await served.optimizer.CancelOptimizationJob(
            rpc.CancelOptimizationJobRequest(name=created.name)
        )
    ).optimization_job
    assert cancelling.state == pb.OPTIMIZATION_JOB_STATE_CANCELLING
    again = (
        await served.optimizer.CancelOptimizationJob(
            rpc.CancelOptimizationJobRequest(name=created.name)
        )
    ).optimization_job
    assert again.state == pb.OPTIMIZATION_JOB_STATE_CANCELLING
    final = (await watch(served, created.name))[-1]
    assert final.state == pb.OPTIMIZATION_JOB_STATE_CANCELLED
    assert {r.state for r in final.results} == {pb.TECHNIQUE_STATE_CANCELLED}
    assert await versions_of(served, "models/mlp") == before


@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_a_job_left_running_runs_again_when_the_optimizer_restarts(
    tmp_path: Path, mlp: Trained
) -> None:
    registry_server = await build_registry(
        RegistrySettings(data_dir=tmp_path, shutdown_grace=timedelta(seconds=1))
    )
    settings = OptimizerSettings(
        data_dir=tmp_path,
        shutdown_grace=timedelta(seconds=1),
        registry_addr=f"127.0.0.1:{registry_server.port}",
    )
    registry_channel = grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}")
    registry = registry_service_pb2_grpc.RegistryServiceStub(registry_channel)
    try:
        source = await register_source(registry, mlp, "mlp")
        first = await build_optimizer(settings)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{first.port}")
        stub = optimizer_service_pb2_grpc.OptimizerServiceStub(channel)
        served = Served(first, stub, registry, source)
        slow_then_quick = job(
            source,
            pb.TechniqueSpec(fp16=pb.Fp16Options()),
            measurement=pb.MeasurementConfig(batch_sizes=[1], warmup_runs=1, timed_runs=20_000),
        )
        created = await create(served, slow_then_quick)
        await wait_for_state(served, created.name, pb.OPTIMIZATION_JOB_STATE_RUNNING)
        await channel.close(None)
        await first.shutdown()  # the job stops and stays RUNNING, to run again
        second = await build_optimizer(settings)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{second.port}")
        stub = optimizer_service_pb2_grpc.OptimizerServiceStub(channel)
        served = Served(second, stub, registry, source)
        try:
            final = (await watch(served, created.name))[-1]
            assert final.state == pb.OPTIMIZATION_JOB_STATE_SUCCEEDED, final.error
            [result] = final.results
            assert result.state == pb.TECHNIQUE_STATE_SUCCEEDED
            # Registered once, though the job started twice.
            assert sorted(await versions_of(served, "models/mlp")) == [
                "models/mlp/versions/1",
                "models/mlp/versions/2",
            ]
        finally:
            await channel.close(None)
            await second.shutdown()
    finally:
        await registry_channel.close(None)
        await registry_server.shutdown()


EVERY_TECHNIQUE = (
    (pb.TechniqueSpec(onnx_export=pb.OnnxExportOptions()), registry_pb.MODEL_FORMAT_ONNX_FP32),
    (
        pb.TechniqueSpec(graph_optimization=pb.GraphOptimizationOptions()),
        registry_pb.MODEL_FORMAT_ONNX_FP32,
    ),
    (
        pb.TechniqueSpec(dynamic_int8=pb.DynamicInt8Options()),
        registry_pb.MODEL_FORMAT_ONNX_INT8_DYNAMIC,
    ),
    (
        pb.TechniqueSpec(static_int8=pb.StaticInt8Options(per_channel=True)),
        registry_pb.MODEL_FORMAT_ONNX_INT8_STATIC,
    ),
    (pb.TechniqueSpec(fp16=pb.Fp16Options()), registry_pb.MODEL_FORMAT_ONNX_FP16),
    (
        pb.TechniqueSpec(
            pruning=pb.PruningOptions(
                method=pb.PRUNING_METHOD_UNSTRUCTURED, amount=0.3, fine_tune_epochs=1
            )
        ),
        registry_pb.MODEL_FORMAT_ONNX_FP32,
    ),
)


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
async def test_every_technique_through_the_api_on_the_mlp_and_the_cnn(
    served: Served, model: str, request: pytest.FixtureRequest
) -> None:
    trained: Trained = request.getfixturevalue(model)
    source = served.source
    if model == "cnn":
        source = await register_source(served.registry, trained, "small-cnn")
    # A lenient gate: every result is registered, and each is checked here.
    lenient = pb.OptimizationGate(latency_tolerance=1000.0, max_accuracy_drop_points=100.0)
    created = await create(
        served, job(source, *(spec for spec, _ in EVERY_TECHNIQUE), gate=lenient)
    )
    final = (await watch(served, created.name))[-1]
    assert final.state == pb.OPTIMIZATION_JOB_STATE_SUCCEEDED, final.error
    splits = load_splits(trained.source.version)
    features = np.asarray(splits.test.features, dtype=np.float32)
    labels = np.asarray(splits.test.labels)
    for result, (_, expected_format) in zip(final.results, EVERY_TECHNIQUE, strict=True):
        assert result.state == pb.TECHNIQUE_STATE_SUCCEEDED, result.error
        version = (
            await served.registry.GetModelVersion(
                registry_rpc.GetModelVersionRequest(name=result.model_version)
            )
        ).model_version
        assert version.format == expected_format
        assert version.lineage.parent_version == source
        _, data = await download(served.registry, version.name)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        outputs = np.asarray(session.run(None, {"input": features})[0], dtype=np.float64)
        accuracy = float(np.mean(outputs.argmax(axis=1) == labels))
        report = result.report
        assert report.candidate.metrics["accuracy"] == pytest.approx(accuracy)
        assert report.candidate.evaluation_samples == len(labels)
        if result.technique in (pb.TECHNIQUE_ONNX_EXPORT, pb.TECHNIQUE_GRAPH_OPTIMIZATION):
            assert report.parity.max_abs_error <= 1e-4
            assert report.candidate.metrics["accuracy"] == pytest.approx(trained.test_accuracy)
        if result.technique == pb.TECHNIQUE_PRUNING:
            assert report.candidate.sparsity > 0.2
