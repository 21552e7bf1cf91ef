"""A deployment's configuration: checked, and completed with the server's defaults.

:func:`check_deployment` finds every bad field of a ``Deployment`` at once
(INVALID_ARGUMENT with a violation per field) and what this machine cannot
do (FAILED_PRECONDITION: CUDA without a GPU). :func:`traffic_targets` and
:func:`serving_options` are the configuration as the runtime uses it: the
default split (all traffic to ``@production``) and every unset setting taken
from :class:`~.settings.InferenceSettings`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Final

from conveyor.inference.v1 import resources_pb2 as pb
from conveyor.services.inference.settings import InferenceSettings
from conveyor.services.inference.versions import OPTIMIZATION_LEVELS, ServingOptions
from conveyor.shared import onnx_runtime
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    raise_if_any,
)
from conveyor.shared.names import parse_model_name, parse_model_version_ref
from conveyor.shared.wellknown import to_timedelta

MAX_TARGETS: Final = 8
MAX_BATCH_SIZE: Final = 4096
MAX_QUEUE_DELAY: Final = timedelta(seconds=1)
MAX_QUEUE_SIZE: Final = 65_536
MAX_INSTANCES: Final = 16
MAX_THREADS: Final = 256
MAX_WARMUP_ITERATIONS: Final = 100
MAX_ON_DEMAND_VERSIONS: Final = 8
DEFAULT_ON_DEMAND_VERSIONS: Final = 2
DEFAULT_ON_DEMAND_IDLE: Final = timedelta(minutes=10)
MAX_LABELS: Final = 64


def check_deployment(deployment: pb.Deployment) -> str:
    """The model id of a valid ``deployment``; INVALID_ARGUMENT listing every
    bad field otherwise, FAILED_PRECONDITION for CUDA without a GPU."""
    violations: list[FieldViolation] = []
    model_id = _model_id(deployment.model, violations)
    references: list[str] = []
    targets = deployment.traffic.targets
    if len(targets) > MAX_TARGETS:
        violations.append(
            FieldViolation("deployment.traffic.targets", f"at most {MAX_TARGETS} targets")
        )
    for index, target in enumerate(targets):
        field = f"deployment.traffic.targets[{index}]"
        _reference(target.model_version, model_id, f"{field}.model_version", violations)
        if target.model_version in references:
            violations.append(
                FieldViolation(f"{field}.model_version", f"{target.model_version} given twice")
            )
        references.append(target.model_version)
        if not 0 <= target.percent <= 100:
            violations.append(FieldViolation(f"{field}.percent", "0 to 100"))
    if targets and sum(t.percent for t in targets) != 100:
        violations.append(
            FieldViolation(
                "deployment.traffic.targets",
                f"the percentages add up to {sum(t.percent for t in targets)}, not 100",
            )
        )
    if deployment.HasField("shadow"):
        shadow = deployment.shadow
        _reference(shadow.model_version, model_id, "deployment.shadow.model_version", violations)
        if shadow.model_version in references:
            violations.append(
                FieldViolation(
                    "deployment.shadow.model_version", "the shadow must not be a traffic target"
                )
            )
        _within(violations, "deployment.shadow.sample_percent", shadow.sample_percent, 0, 100)
        if not shadow.tolerance >= 0:
            violations.append(FieldViolation("deployment.shadow.tolerance", "0 or more"))
    batching = deployment.batching
    _within(
        violations, "deployment.batching.max_batch_size", batching.max_batch_size, 0, MAX_BATCH_SIZE
    )
    _within(
        violations, "deployment.batching.max_queue_size", batching.max_queue_size, 0, MAX_QUEUE_SIZE
    )
    if batching.HasField("max_queue_delay"):
        delay = to_timedelta(batching.max_queue_delay)
        if delay is None or not timedelta(0) <= delay <= MAX_QUEUE_DELAY:
            violations.append(
                FieldViolation("deployment.batching.max_queue_delay", "0 to 1 second")
            )
    runtime = deployment.runtime
    _within(
        violations, "deployment.runtime.instance_count", runtime.instance_count, 0, MAX_INSTANCES
    )
    _within(
        violations, "deployment.runtime.intra_op_threads", runtime.intra_op_threads, 0, MAX_THREADS
    )
    _within(
        violations, "deployment.runtime.inter_op_threads", runtime.inter_op_threads, 0, MAX_THREADS
    )
    _within(violations, "deployment.runtime.gpu_device_id", runtime.gpu_device_id, 0, 63)
    if runtime.execution_provider not in pb.ExecutionProvider.values():
        violations.append(FieldViolation("deployment.runtime.execution_provider", "unknown"))
    if runtime.graph_optimization_level not in OPTIMIZATION_LEVELS:
        violations.append(FieldViolation("deployment.runtime.graph_optimization_level", "unknown"))
    warmup = deployment.warmup
    _within(violations, "deployment.warmup.iterations", warmup.iterations, 0, MAX_WARMUP_ITERATIONS)
    for index, size in enumerate(warmup.batch_sizes):
        _within(violations, f"deployment.warmup.batch_sizes[{index}]", size, 1, MAX_BATCH_SIZE)
    if deployment.HasField("max_on_demand_versions"):
        _within(
            violations,
            "deployment.max_on_demand_versions",
            deployment.max_on_demand_versions,
            0,
            MAX_ON_DEMAND_VERSIONS,
        )
    idle = to_timedelta(deployment.on_demand_idle_timeout)
    if deployment.HasField("on_demand_idle_timeout") and (idle is None or idle <= timedelta(0)):
        violations.append(
            FieldViolation("deployment.on_demand_idle_timeout", "a positive duration")
        )
    if deployment.HasField("prediction_log_sample_rate"):
        rate = deployment.prediction_log_sample_rate
        if not 0.0 <= rate <= 1.0:
            violations.append(FieldViolation("deployment.prediction_log_sample_rate", "0 to 1"))
    _labels(deployment, violations)
    raise_if_any(violations, "invalid deployment")
    if runtime.execution_provider == pb.EXECUTION_PROVIDER_CUDA and not onnx_runtime.gpu_present():
        raise FailedPreconditionError(
            "the CUDA execution provider was asked for and no GPU is present",
            reason="NO_GPU",
        )
    return model_id


def traffic_targets(deployment: pb.Deployment, default_alias: str) -> list[tuple[str, int]]:
    """The split as (reference, percent); unset: all to ``models/m@<default>``."""
    if deployment.traffic.targets:
        return [(t.model_version, t.percent) for t in deployment.traffic.targets]
    return [(f"{deployment.model}@{default_alias}", 100)]


def serving_options(deployment: pb.Deployment, settings: InferenceSettings) -> ServingOptions:
    """How the deployment's versions are loaded, unset fields from ``settings``."""
    runtime = deployment.runtime
    batching = deployment.batching
    cuda = runtime.execution_provider == pb.EXECUTION_PROVIDER_CUDA or (
        runtime.execution_provider
        in (pb.EXECUTION_PROVIDER_UNSPECIFIED, pb.EXECUTION_PROVIDER_AUTO)
        and onnx_runtime.gpu_present()
    )
    instances = runtime.instance_count or 1
    return ServingOptions(
        provider=onnx_runtime.CUDA if cuda else onnx_runtime.CPU,
        gpu_device_id=runtime.gpu_device_id,
        instance_count=instances,
        intra_op_threads=runtime.intra_op_threads
        or settings.intra_op_threads
        or default_threads(settings.processes, instances),
        inter_op_threads=runtime.inter_op_threads,
        optimization_level=OPTIMIZATION_LEVELS[runtime.graph_optimization_level],
        max_batch_size=batching.max_batch_size or settings.max_batch_size,
        max_queue_delay=batching.max_queue_delay.ToTimedelta()
        if batching.HasField("max_queue_delay")
        else settings.max_queue_delay,
        max_queue_size=batching.max_queue_size or settings.max_queue_size,
        warmup_iterations=deployment.warmup.iterations or settings.warmup_iterations,
        warmup_batch_sizes=tuple(deployment.warmup.batch_sizes),
    )


def default_threads(processes: int, instances: int) -> int:
    """The machine's cores shared among the processes and their instances, so
    sessions do not oversubscribe the CPU (at least 1)."""
    return max(1, (os.cpu_count() or 1) // (processes * instances))


def on_demand_limit(deployment: pb.Deployment) -> int:
    if deployment.HasField("max_on_demand_versions"):
        return deployment.max_on_demand_versions
    return DEFAULT_ON_DEMAND_VERSIONS


def on_demand_idle(deployment: pb.Deployment) -> timedelta:
    if deployment.HasField("on_demand_idle_timeout"):
        return deployment.on_demand_idle_timeout.ToTimedelta()
    return DEFAULT_ON_DEMAND_IDLE


def _model_id(model: str, violations: list[FieldViolation]) -> str:
    try:
        return parse_model_name(model, field="deployment.model")
    except InvalidArgumentError as error:
        violations.extend(error.violations)
        return ""


def _reference(reference: str, model_id: str, field: str, violations: list[FieldViolation]) -> None:
    try:
        parsed = parse_model_version_ref(reference, field=field)
    except InvalidArgumentError as error:
        violations.extend(error.violations)
        return
    if model_id and parsed.model != model_id:
        violations.append(
            FieldViolation(field, f"{reference} is not a version of models/{model_id}")
        )


def _within(violations: list[FieldViolation], field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        violations.append(FieldViolation(field, f"{low} to {high}, got {value}"))


def _labels(deployment: pb.Deployment, violations: list[FieldViolation]) -> None:
    if len(deployment.labels) > MAX_LABELS:
        violations.append(FieldViolation("deployment.labels", f"at most {MAX_LABELS} entries"))
    for key, value in deployment.labels.items():
        valid_key = 0 < len(key) <= 63 and all(c.islower() or c.isdigit() or c in "_-" for c in key)
        if not valid_key or len(value) > 63:
            violations.append(
                FieldViolation(
                    f"deployment.labels[{key!r}]",
                    "keys of 1-63 lowercase letters, digits, _ and -; values of at most 63",
                )
            )
