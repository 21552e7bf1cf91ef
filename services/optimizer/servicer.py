"""``conveyor.optimizer.v1.OptimizerService``: optimisation jobs and their reports.

Transport only: parse and validate requests (everything that can be checked
without doing the work, the source read from the registry included), hand
jobs to the :class:`~.jobs.JobManager`, stream watch updates. Errors are
raised as ConveyorError and mapped to statuses by the shared interceptor; a
refused request creates no job and registers nothing.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC
from functools import partial
from typing import Any, Final

from conveyor.optimizer.v1 import optimizer_messages_pb2 as rpc
from conveyor.optimizer.v1 import optimizer_service_pb2_grpc
from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.optimizer import gate, runtime, transforms
from conveyor.services.optimizer.jobs import JobManager, OptimizationWatchHub
from conveyor.services.optimizer.registry_gateway import RegistryGateway
from conveyor.services.optimizer.source import ONNX_FORMATS, data_spec
from conveyor.services.optimizer.store import OptimizerStore, now, state_name
from conveyor.services.optimizer.techniques import TECHNIQUE_OF, technique_of
from conveyor.services.trainer import datasets
from conveyor.shared import names, pagination
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    invalid_field,
    raise_if_any,
)
from conveyor.shared.filtering import FieldKind, FilterField, parse_filter
from conveyor.shared.workers import WorkerThreads

MAX_TECHNIQUES: Final = 16
MAX_BATCH_SIZES: Final = 8
MAX_BATCH_SIZE: Final = 1024
MAX_WARMUP_RUNS: Final = 1000
MAX_TIMED_RUNS: Final = 100_000
MAX_THREADS: Final = 256
MAX_CALIBRATION_SAMPLES: Final = 10_000
MAX_FINE_TUNE_EPOCHS: Final = 50
WATCH_INTERVAL_S: Final = 0.25
"""Whole-job updates go to each watcher at most this often ("a few per second")."""
PYTORCH_ONLY: Final = frozenset({pb.TECHNIQUE_ONNX_EXPORT, pb.TECHNIQUE_PRUNING})

_RESULT_ID = re.compile(r"^[a-z0-9-]{1,63}\Z")
_REPORT = re.compile(
    r"^optimizationJobs/(?P<job>[a-z][a-z0-9-]{0,62})/reports/(?P<id>[a-z0-9-]{1,63})$"
)

JOB_FILTERS: Final = {
    "state": FilterField(
        FieldKind.ENUM,
        frozenset(
            name.removeprefix("OPTIMIZATION_JOB_STATE_")
            for name in pb.OptimizationJobState.keys()  # noqa: SIM118 - an enum wrapper
            if not name.endswith("UNSPECIFIED")
        ),
    ),
    "resolved_source_model_version": FilterField(FieldKind.STRING),
    "source_model_version": FilterField(FieldKind.STRING),
    "create_time": FilterField(FieldKind.TIMESTAMP),
}


def default_result_ids(techniques: Sequence[pb.TechniqueSpec]) -> list[str]:
    """Each technique's result id: the given one, or the technique in kebab
    case (``static-int8``), suffixed ``-2``, ``-3``... when repeated."""
    seen: dict[str, int] = {}
    ids = []
    for spec in techniques:
        if spec.result_id:
            ids.append(spec.result_id)
            continue
        base = (spec.WhichOneof("options") or "technique").replace("_", "-")
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return ids


class OptimizerServicer(optimizer_service_pb2_grpc.OptimizerServiceServicer):
    def __init__(
        self,
        store: OptimizerStore,
        manager: JobManager,
        hub: OptimizationWatchHub,
        gateway: RegistryGateway,
        workers: WorkerThreads,
        *,
        max_queued_jobs: int,
    ) -> None:
        self._store = store
        self._manager = manager
        self._hub = hub
        self._gateway = gateway
        self._workers = workers
        self._max_queued_jobs = max_queued_jobs

    async def CreateOptimizationJob(
        self, request: rpc.CreateOptimizationJobRequest, context: Any
    ) -> Any:
        job_id = request.optimization_job_id or f"opt-{uuid.uuid4().hex[:12]}"
        names.check_id(job_id, field="optimization_job_id")
        fingerprint = pagination.fingerprint(
            request.optimization_job.SerializeToString(deterministic=True), job_id
        )
        done = await self._workers.run(self._store.find_request, request.request_id, fingerprint)
        if done is not None:
            return rpc.CreateOptimizationJobResponse(optimization_job=self._manager.overlay(done))
        job = await self._validated_job(request.optimization_job, job_id)
        created = await self._workers.run(
            self._store.create_job,
            job,
            max_queued=self._max_queued_jobs,
            request_id=request.request_id,
            fingerprint=fingerprint,
        )
        self._manager.notify()
        return rpc.CreateOptimizationJobResponse(optimization_job=created)

    async def _validated_job(self, given: pb.OptimizationJob, job_id: str) -> pb.OptimizationJob:
        field = "optimization_job"
        violations: list[FieldViolation] = []
        try:
            names.parse_model_version_ref(
                given.source_model_version, field=f"{field}.source_model_version"
            )
        except InvalidArgumentError as error:
            violations += error.violations
        if given.dataset:
            try:
                names.parse_resource_name(given.dataset, "datasets", field=f"{field}.dataset")
            except InvalidArgumentError as error:
                violations += error.violations
        result_ids = default_result_ids(given.techniques)
        violations += _technique_violations(given.techniques, result_ids, f"{field}.techniques")
        violations += gate.gate_violations(given.gate, f"{field}.gate")
        violations += _measurement_violations(given.measurement, f"{field}.measurement")
        raise_if_any(violations, "invalid optimisation job")
        runtime.resolve_provider(given.measurement.execution_provider)  # NO_GPU
        version = await self._gateway.version(given.source_model_version)
        self._check_source(version, given)
        techniques, results = [], []
        for spec, result_id in zip(given.techniques, result_ids, strict=True):
            named = pb.TechniqueSpec()
            named.CopyFrom(spec)
            named.result_id = result_id
            techniques.append(named)
            results.append(
                pb.TechniqueResult(
                    result_id=result_id,
                    technique=technique_of(spec),
                    state=pb.TECHNIQUE_STATE_PENDING,
                )
            )
        created = now()
        return pb.OptimizationJob(
            name=f"optimizationJobs/{job_id}",
            source_model_version=given.source_model_version,
            resolved_source_model_version=version.name,
            techniques=techniques,
            gate=given.gate,
            measurement=given.measurement,
            dataset=given.dataset,
            state=pb.OPTIMIZATION_JOB_STATE_QUEUED,
            results=results,
            progress=pb.OptimizationProgress(
                phase=pb.OPTIMIZATION_PHASE_QUEUED,
                total_techniques=len(results),
                message="queued",
                update_time=created,
            ),
            create_time=created,
        )

    def _check_source(self, version: registry_pb.ModelVersion, given: pb.OptimizationJob) -> None:
        """FAILED_PRECONDITION for a source the techniques or data cannot work on."""
        if version.state == registry_pb.MODEL_VERSION_STATE_ARCHIVED:
            raise FailedPreconditionError(
                f"{version.name} is archived",
                reason="SOURCE_ARCHIVED",
                metadata={"name": version.name},
            )
        pytorch = version.format == registry_pb.MODEL_FORMAT_TORCH_STATE_DICT
        for index, spec in enumerate(given.techniques):
            technique = technique_of(spec)
            if technique in PYTORCH_ONLY and not pytorch:
                raise _unsuitable(version, index, spec, "works on PyTorch models only")
            fp32_onnx = version.format == registry_pb.MODEL_FORMAT_ONNX_FP32
            if technique not in PYTORCH_ONLY and not (pytorch or fp32_onnx):
                raise _unsuitable(version, index, spec, "needs an fp32 source")
        if not pytorch and version.format not in ONNX_FORMATS:
            raise FailedPreconditionError(
                f"{version.name} has no optimisable format",
                reason="UNSUPPORTED_FORMAT",
                metadata={"name": version.name},
            )
        data = data_spec(version, given.dataset)  # FAILED_PRECONDITION without a dataset
        if not datasets.is_builtin(data.dataset):
            raise FailedPreconditionError(
                f"{data.dataset} is not a built-in dataset; the optimizer evaluates on the "
                "built-in datasets (breast-cancer, digits, synthetic)",
                reason="DATASET_NOT_SUPPORTED",
                metadata={"dataset": data.dataset},
            )
        schema = datasets.builtin_schema(data.dataset, data.generator_args, field="dataset")
        inputs = version.signature.inputs
        expected = tuple(int(d) for d in inputs[0].shape[1:]) if inputs else ()
        if schema.example_shape != expected:
            raise FailedPreconditionError(
                f"{data.dataset}'s examples have shape {list(schema.example_shape)}, but "
                f"{version.name} takes {list(expected)}",
                reason="DATASET_SHAPE_MISMATCH",
                metadata={"dataset": data.dataset, "model_version": version.name},
            )

    async def GetOptimizationJob(self, request: rpc.GetOptimizationJobRequest, context: Any) -> Any:
        job_id = names.parse_resource_name(request.name, "optimizationJobs")
        return rpc.GetOptimizationJobResponse(optimization_job=await self._manager.get(job_id))

    async def ListOptimizationJobs(
        self, request: rpc.ListOptimizationJobsRequest, context: Any
    ) -> Any:
        size = pagination.page_size(request.page_size)
        restrictions = parse_filter(request.filter, JOB_FILTERS)
        descending = pagination.newest_first(request.order_by)
        fingerprint = pagination.fingerprint(request.filter, request.order_by)
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        page = await self._workers.run(
            self._store.list_jobs,
            restrictions,
            _job_field,
            descending=descending,
            offset=cursor.offset,
            limit=size,
        )
        token = pagination.next_page_token(page.has_more, cursor, size, fingerprint)
        return rpc.ListOptimizationJobsResponse(
            optimization_jobs=[self._manager.overlay(job) for job in page.items],
            next_page_token=token,
        )

    async def CancelOptimizationJob(
        self, request: rpc.CancelOptimizationJobRequest, context: Any
    ) -> Any:
        job_id = names.parse_resource_name(request.name, "optimizationJobs")
        return rpc.CancelOptimizationJobResponse(
            optimization_job=await self._manager.cancel(job_id)
        )

    async def WatchOptimizationJob(
        self, request: rpc.WatchOptimizationJobRequest, context: Any
    ) -> AsyncIterator[rpc.WatchOptimizationJobResponse]:
        job_id = names.parse_resource_name(request.name, "optimizationJobs")
        async for update in self._hub.watch(
            request.name, WATCH_INTERVAL_S, partial(self._manager.get, job_id)
        ):
            yield update

    async def GetOptimizationReport(
        self, request: rpc.GetOptimizationReportRequest, context: Any
    ) -> Any:
        match = _REPORT.match(request.name)
        if match is None:
            raise invalid_field("name", "expected optimizationJobs/{job}/reports/{report}")
        job = await self._manager.get(match["job"])
        for result in job.results:
            if result.result_id == match["id"] and result.HasField("report"):
                return rpc.GetOptimizationReportResponse(report=result.report)
        raise NotFoundError(
            f"{request.name} does not exist (no such result, or not measured yet)",
            reason="REPORT_NOT_FOUND",
            metadata={"name": request.name},
        )


# -- validation ----------------------------------------------------------------------


def _technique_violations(
    techniques: Sequence[pb.TechniqueSpec], result_ids: list[str], field: str
) -> list[FieldViolation]:
    violations = []
    if not 1 <= len(techniques) <= MAX_TECHNIQUES:
        violations.append(FieldViolation(field, f"from 1 to {MAX_TECHNIQUES} techniques"))
    for index, (spec, result_id) in enumerate(zip(techniques, result_ids, strict=True)):
        at = f"{field}[{index}]"
        if not _RESULT_ID.match(result_id):
            violations.append(FieldViolation(f"{at}.result_id", "1 to 63 of [a-z0-9-]"))
        elif result_ids.index(result_id) != index:
            violations.append(FieldViolation(f"{at}.result_id", "already used in this job"))
        kind = spec.WhichOneof("options")
        if kind is None:
            known = ", ".join(TECHNIQUE_OF)
            violations.append(
                FieldViolation(at, f"no technique set (one of {known}); an unknown one?")
            )
            continue
        violations += _option_violations(spec, f"{at}.{kind}")
    return violations


def _option_violations(spec: pb.TechniqueSpec, at: str) -> list[FieldViolation]:
    violations = []
    kind = spec.WhichOneof("options")
    if kind == "onnx_export":
        opset = spec.onnx_export.opset
        if opset and not transforms.MIN_OPSET <= opset <= transforms.MAX_OPSET:
            violations.append(
                FieldViolation(
                    f"{at}.opset",
                    f"0 (meaning {transforms.DEFAULT_OPSET}) or "
                    f"{transforms.MIN_OPSET} to {transforms.MAX_OPSET}",
                )
            )
    elif kind == "graph_optimization":
        if spec.graph_optimization.level not in pb.GraphOptimizationLevel.values():
            violations.append(FieldViolation(f"{at}.level", "BASIC, EXTENDED or ALL"))
    elif kind == "dynamic_int8":
        if spec.dynamic_int8.weight_type not in pb.QuantizationWeightType.values():
            violations.append(FieldViolation(f"{at}.weight_type", "INT8 or UINT8"))
    elif kind == "static_int8":
        calibration = spec.static_int8
        if not 0 <= calibration.calibration_samples <= MAX_CALIBRATION_SAMPLES:
            violations.append(
                FieldViolation(
                    f"{at}.calibration_samples", f"0 (meaning 512) to {MAX_CALIBRATION_SAMPLES}"
                )
            )
        if calibration.activation_type not in pb.QuantizationWeightType.values():
            violations.append(FieldViolation(f"{at}.activation_type", "INT8 or UINT8"))
        if calibration.calibration_method not in pb.CalibrationMethod.values():
            violations.append(
                FieldViolation(f"{at}.calibration_method", "MINMAX, ENTROPY or PERCENTILE")
            )
    elif kind == "pruning":
        options = spec.pruning
        if options.method not in (pb.PRUNING_METHOD_UNSTRUCTURED, pb.PRUNING_METHOD_STRUCTURED):
            violations.append(
                FieldViolation(f"{at}.method", "required: UNSTRUCTURED or STRUCTURED")
            )
        if not (math.isfinite(options.amount) and 0.0 < options.amount < 1.0):
            violations.append(FieldViolation(f"{at}.amount", "greater than 0 and less than 1"))
        if not 0 <= options.fine_tune_epochs <= MAX_FINE_TUNE_EPOCHS:
            violations.append(
                FieldViolation(f"{at}.fine_tune_epochs", f"0 to {MAX_FINE_TUNE_EPOCHS}")
            )
        rate = options.fine_tune_learning_rate
        if not (math.isfinite(rate) and rate >= 0.0):
            violations.append(
                FieldViolation(f"{at}.fine_tune_learning_rate", "0 (the default) or positive")
            )
    return violations


def _measurement_violations(config: pb.MeasurementConfig, field: str) -> list[FieldViolation]:
    violations = []
    sizes = list(config.batch_sizes)
    if len(sizes) > MAX_BATCH_SIZES or len(set(sizes)) != len(sizes):
        violations.append(
            FieldViolation(f"{field}.batch_sizes", f"at most {MAX_BATCH_SIZES} distinct values")
        )
    if any(not 1 <= size <= MAX_BATCH_SIZE for size in sizes):
        violations.append(
            FieldViolation(f"{field}.batch_sizes", f"each from 1 to {MAX_BATCH_SIZE}")
        )
    for name, top in (
        ("warmup_runs", MAX_WARMUP_RUNS),
        ("timed_runs", MAX_TIMED_RUNS),
        ("intra_op_threads", MAX_THREADS),
    ):
        if not 0 <= getattr(config, name) <= top:
            violations.append(FieldViolation(f"{field}.{name}", f"0 (the default) to {top}"))
    if config.execution_provider not in pb.ExecutionProvider.values():
        violations.append(FieldViolation(f"{field}.execution_provider", "CPU or CUDA"))
    return violations


def _unsuitable(
    version: registry_pb.ModelVersion, index: int, spec: pb.TechniqueSpec, why: str
) -> FailedPreconditionError:
    kind = spec.WhichOneof("options") or "technique"
    source_format = registry_pb.ModelFormat.Name(version.format).removeprefix("MODEL_FORMAT_")
    return FailedPreconditionError(
        f"techniques[{index}] ({kind}) {why}, and {version.name} is {source_format}",
        reason="TECHNIQUE_NOT_APPLICABLE",
        metadata={"technique": kind, "model_version": version.name, "format": source_format},
    )


def _job_field(job: pb.OptimizationJob, field: str) -> object:
    if field == "state":
        return state_name(job.state)
    if field == "create_time":
        return job.create_time.ToDatetime(tzinfo=UTC)
    value: str = getattr(job, field)
    return value
