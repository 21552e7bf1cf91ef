"""Validation of a ``TrainingJobSpec`` against a dataset, before any work starts.

:func:`validate_training_spec` checks every field at once and raises one
INVALID_ARGUMENT whose field violations name each bad value by its path in
the request (``spec.hyperparameters.learning_rate``,
``spec.architecture.args.hidden_sizes``, ``spec.data.validation_fraction``).
Asking for CUDA where there is none is FAILED_PRECONDITION.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from conveyor.services.trainer.architectures import (
    DROPOUT_ARCHITECTURES,
    ArchitectureConfig,
    check_architecture,
)
from conveyor.services.trainer.augmentation import Augmentation, augmentation_violations
from conveyor.services.trainer.datasets import SYNTHETIC, DatasetSchema
from conveyor.services.trainer.splits import fraction_violations, split_sizes_violations
from conveyor.shared import names
from conveyor.shared.errors import (
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    raise_if_any,
)
from conveyor.trainer.v1 import resources_pb2 as pb

MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_LEARNING_RATE = 10.0
MAX_WORLD_SIZE = 64
MAX_PATIENCE = 10_000
METRICS = ("loss", "accuracy", "precision", "recall", "f1", "log_loss", "roc_auc")
"""The validation metrics of every epoch (``roc_auc`` for binary tasks only)."""


@dataclass(frozen=True)
class EarlyStopping:
    """The resolved early-stopping rule."""

    metric: str
    maximize: bool
    patience: int
    min_delta: float


@dataclass(frozen=True)
class ResolvedSpec:
    """A validated spec with every default applied."""

    architecture: ArchitectureConfig
    epochs: int
    batch_size: int
    optimizer: pb.OptimizerAlgorithm.ValueType
    learning_rate: float
    momentum: float
    weight_decay: float
    dropout: float
    seed: int
    augmentation: Augmentation | None
    early_stopping: EarlyStopping | None
    device: pb.Device.ValueType
    """CPU or CUDA (AUTO resolved)."""
    mixed_precision: bool
    world_size: int
    backend: pb.DistributedBackend.ValueType
    """GLOO or NCCL (UNSPECIFIED resolved)."""
    fingerprint: str
    """SHA-256 of what determines the trained weights (data spec, architecture,
    hyperparameters, compute): a checkpoint only resumes the spec it came from."""


def validate_training_spec(
    spec: pb.TrainingJobSpec,
    schema: DatasetSchema,
    *,
    cuda_available: bool,
    field: str = "spec",
) -> ResolvedSpec:
    """Check ``spec`` for data of ``schema``; every default applied in the result."""
    violations: list[FieldViolation] = []
    data_field = f"{field}.data"
    if not spec.data.dataset:
        violations.append(FieldViolation(f"{data_field}.dataset", "required"))
    else:
        _check_name(spec.data.dataset, "datasets", f"{data_field}.dataset", violations)
    if spec.data.generator_args.fields and spec.data.dataset != SYNTHETIC:
        violations.append(FieldViolation(f"{data_field}.generator_args", f"only for {SYNTHETIC}"))
    for index, extra in enumerate(spec.data.additional_datasets):
        _check_name(extra, "datasets", f"{data_field}.additional_datasets[{index}]", violations)
    violations += fraction_violations(spec.data, field=data_field)
    if not spec.data.stratify:
        violations += split_sizes_violations(spec.data, schema.num_examples, field=data_field)
    if not spec.HasField("architecture") or not spec.architecture.name:
        violations.append(FieldViolation(f"{field}.architecture.name", "required"))
    architecture = check_architecture(
        spec.architecture,
        schema.example_shape,
        schema.num_classes,
        f"{field}.architecture",
        violations if spec.architecture.name else [],
    )
    hp_field = f"{field}.hyperparameters"
    hp = spec.hyperparameters
    if not spec.HasField("hyperparameters"):
        violations.append(FieldViolation(hp_field, "required"))
    optimizer = hp.optimizer or pb.OPTIMIZER_ALGORITHM_ADAM
    _hyperparameter_violations(hp, optimizer, architecture.name, hp_field, violations)
    augmentation = None
    if hp.HasField("augmentation"):
        image_shape = schema.example_shape if len(schema.example_shape) == 3 else None
        found = augmentation_violations(hp.augmentation, image_shape, f"{hp_field}.augmentation")
        violations += found
        augmentation = Augmentation.from_proto(hp.augmentation)
    early_stopping = None
    if hp.HasField("early_stopping"):
        early_stopping = _early_stopping(
            hp.early_stopping, schema, f"{hp_field}.early_stopping", violations
        )
    device, mixed_precision, world_size, backend = _compute(
        spec.compute, hp.batch_size, cuda_available, f"{field}.compute", violations
    )
    if (
        spec.HasField("max_run_duration")
        and spec.max_run_duration.ToTimedelta().total_seconds() <= 0
    ):
        violations.append(FieldViolation(f"{field}.max_run_duration", "positive when set"))
    if spec.registration.model:
        _check_model(spec.registration.model, f"{field}.registration.model", violations)
    elif spec.HasField("registration"):
        violations.append(FieldViolation(f"{field}.registration.model", "required"))
    raise_if_any(violations, "invalid training job spec")
    if spec.compute.device == pb.DEVICE_CUDA and not cuda_available:
        raise FailedPreconditionError("CUDA was asked for and no GPU is present", reason="NO_GPU")
    return ResolvedSpec(
        architecture=architecture,
        epochs=hp.epochs,
        batch_size=hp.batch_size,
        optimizer=optimizer,
        learning_rate=hp.learning_rate,
        momentum=hp.momentum,
        weight_decay=hp.weight_decay,
        dropout=hp.dropout,
        seed=hp.seed,
        augmentation=augmentation if augmentation and augmentation.enabled else None,
        early_stopping=early_stopping,
        device=device,
        mixed_precision=mixed_precision,
        world_size=world_size,
        backend=backend,
        fingerprint=spec_fingerprint(spec),
    )


def spec_fingerprint(spec: pb.TrainingJobSpec) -> str:
    """SHA-256 hex of the parts of ``spec`` that determine the trained weights."""
    hasher = hashlib.sha256()
    for part in (spec.data, spec.architecture, spec.hyperparameters, spec.compute):
        encoded = part.SerializeToString(deterministic=True)
        hasher.update(len(encoded).to_bytes(8, "little"))
        hasher.update(encoded)
    return hasher.hexdigest()


def _hyperparameter_violations(
    hp: pb.Hyperparameters,
    optimizer: pb.OptimizerAlgorithm.ValueType,
    architecture: str,
    field: str,
    violations: list[FieldViolation],
) -> None:
    def bad(name: str, description: str) -> None:
        violations.append(FieldViolation(f"{field}.{name}", description))

    if not 1 <= hp.epochs <= MAX_EPOCHS:
        bad("epochs", f"from 1 to {MAX_EPOCHS}")
    if not 1 <= hp.batch_size <= MAX_BATCH_SIZE:
        bad("batch_size", f"from 1 to {MAX_BATCH_SIZE}")
    if hp.optimizer not in pb.OptimizerAlgorithm.values():
        bad("optimizer", "SGD, ADAM or ADAMW")
    if not (math.isfinite(hp.learning_rate) and 0.0 < hp.learning_rate <= MAX_LEARNING_RATE):
        bad("learning_rate", f"greater than 0 and at most {MAX_LEARNING_RATE}")
    if not (math.isfinite(hp.momentum) and 0.0 <= hp.momentum < 1.0):
        bad("momentum", "in [0, 1)")
    elif hp.momentum and optimizer != pb.OPTIMIZER_ALGORITHM_SGD:
        bad("momentum", "applies to the SGD optimizer only")
    if not (math.isfinite(hp.weight_decay) and hp.weight_decay >= 0.0):
        bad("weight_decay", "a finite number, at least 0")
    if not (math.isfinite(hp.dropout) and 0.0 <= hp.dropout < 1.0):
        bad("dropout", "in [0, 1)")
    elif hp.dropout and architecture not in DROPOUT_ARCHITECTURES:
        bad("dropout", f"{architecture} has no dropout layers")


def _early_stopping(
    spec: pb.EarlyStoppingSpec,
    schema: DatasetSchema,
    field: str,
    violations: list[FieldViolation],
) -> EarlyStopping:
    metrics = METRICS if schema.num_classes == 2 else tuple(m for m in METRICS if m != "roc_auc")
    if spec.metric not in metrics:
        violations.append(
            FieldViolation(f"{field}.metric", f"one of {', '.join(metrics)} for this dataset")
        )
    if spec.goal not in pb.MetricGoal.values():
        violations.append(FieldViolation(f"{field}.goal", "MAXIMIZE or MINIMIZE"))
    if not 1 <= spec.patience <= MAX_PATIENCE:
        violations.append(FieldViolation(f"{field}.patience", f"from 1 to {MAX_PATIENCE}"))
    if not (math.isfinite(spec.min_delta) and spec.min_delta >= 0.0):
        violations.append(FieldViolation(f"{field}.min_delta", "a finite number, at least 0"))
    return EarlyStopping(
        metric=spec.metric,
        maximize=metric_maximized(spec.metric, spec.goal),
        patience=spec.patience,
        min_delta=spec.min_delta,
    )


def metric_maximized(metric: str, goal: pb.MetricGoal.ValueType) -> bool:
    """Whether larger is better: the goal, or by default all but ``loss``/``*_loss``."""
    if goal == pb.METRIC_GOAL_UNSPECIFIED:
        return not (metric == "loss" or metric.endswith("_loss"))
    return goal == pb.METRIC_GOAL_MAXIMIZE


def _compute(
    compute: pb.ComputeSpec,
    batch_size: int,
    cuda_available: bool,
    field: str,
    violations: list[FieldViolation],
) -> tuple[pb.Device.ValueType, bool, int, pb.DistributedBackend.ValueType]:
    if compute.device not in pb.Device.values():
        violations.append(FieldViolation(f"{field}.device", "AUTO, CPU or CUDA"))
    on_cuda = compute.device == pb.DEVICE_CUDA or (
        compute.device in (pb.DEVICE_UNSPECIFIED, pb.DEVICE_AUTO) and cuda_available
    )
    device = pb.DEVICE_CUDA if on_cuda else pb.DEVICE_CPU
    mixed_precision = on_cuda
    if compute.HasField("mixed_precision"):
        if compute.mixed_precision and not on_cuda:
            violations.append(
                FieldViolation(f"{field}.mixed_precision", "mixed precision needs CUDA")
            )
        mixed_precision = compute.mixed_precision and on_cuda
    world_size = compute.distributed.world_size or 1
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        violations.append(
            FieldViolation(f"{field}.distributed.world_size", f"from 1 to {MAX_WORLD_SIZE}")
        )
    elif batch_size >= 1 and batch_size % world_size:
        violations.append(
            FieldViolation(
                f"{field}.distributed.world_size",
                f"must divide the batch size {batch_size}",
            )
        )
    backend = compute.distributed.backend
    if backend not in pb.DistributedBackend.values():
        violations.append(FieldViolation(f"{field}.distributed.backend", "GLOO or NCCL"))
    elif backend == pb.DISTRIBUTED_BACKEND_NCCL and not on_cuda:
        violations.append(FieldViolation(f"{field}.distributed.backend", "NCCL needs CUDA"))
    if backend == pb.DISTRIBUTED_BACKEND_UNSPECIFIED:
        backend = pb.DISTRIBUTED_BACKEND_NCCL if on_cuda else pb.DISTRIBUTED_BACKEND_GLOO
    return device, mixed_precision, world_size, backend


def _check_name(value: str, collection: str, field: str, violations: list[FieldViolation]) -> None:
    try:
        names.parse_resource_name(value, collection, field=field)
    except InvalidArgumentError as error:
        violations.extend(error.violations)


def _check_model(value: str, field: str, violations: list[FieldViolation]) -> None:
    try:
        names.parse_model_name(value, field=field)
    except InvalidArgumentError as error:
        violations.extend(error.violations)
