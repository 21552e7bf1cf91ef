"""The automatic actions of alert rules: rolling an alias back, retraining.

:class:`ActionRunner` executes one :class:`~pb.AlertAction` for one alert and
reports it as an :class:`~pb.ActionExecution`; it never raises for an action
that fails (a refused or failed call, missing data): the execution says
FAILED or, where policy refused, DENIED with the decision.

- **Rollback** moves an alias (``production`` by default) back to the version
  it pointed at before, through the registry's ``SetAlias`` (so policy
  decides and the audit log records it), and only while the alias still
  points at the alert's version: the move is a compare-and-set, so a newer
  promotion is never undone.
- **Retrain** reuses the spec of a training job (the action's, or the one in
  the alert version's lineage) on a new uploaded dataset: the version's
  labelled reference rows plus the labelled predictions of the last
  ``labelled_data_window``, in the original dataset's schema (its feature
  names, in order, and its classes). The dataset and the job get ids and
  request ids derived from the alert and the action, so running the action
  again for the same alert creates nothing twice. The new version, if the
  spec registers one, still passes every promotion gate before it serves.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import grpc
import numpy as np
import numpy.typing as npt

from conveyor.monitor.v1 import resources_pb2 as pb
from conveyor.services.monitor.profiles import VersionProfiles, model_of
from conveyor.services.monitor.references import FeatureSchema, ReferenceData
from conveyor.services.monitor.store import MonitorStore
from conveyor.services.monitor.window_rows import WindowRows
from conveyor.shared.errors import (
    AbortedError,
    AlreadyExistsError,
    ConveyorError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    from_rpc_error,
)
from conveyor.shared.registry_client import RegistryClient
from conveyor.shared.workers import WorkerThreads
from conveyor.trainer.v1 import resources_pb2 as trainer_pb
from conveyor.trainer.v1 import trainer_messages_pb2 as trainer_rpc
from conveyor.trainer.v1 import trainer_service_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_ALIAS: Final = "production"
MAX_REASON_BYTES: Final = 1024
DEFAULT_LABELLED_DATA_WINDOW: Final = timedelta(days=7)
MIN_LABELLED_DATA_WINDOW: Final = timedelta(hours=1)
MIN_LABELLED_PREDICTIONS: Final = 50
"""Fewer recent labelled predictions than this would retrain on (almost) the
old data: the action fails instead."""
UPLOAD_CHUNK_BYTES: Final = 1 << 20
MAX_DISPLAY_NAME_CHARS: Final = 128
MAX_JOB_LABELS: Final = 64
MAX_LABEL_VALUE_CHARS: Final = 63
ALERT_LABEL: Final = "monitor_alert"
RETRAINED_FROM_LABEL: Final = "retrained_from"
PROMOTION_REFUSED: Final = "PROMOTION_REFUSED"
"""The registry's reason when a promotion gate refused an alias move."""
_REQUEST_NAMESPACE: Final = uuid.UUID("2b7f5e1c-94d3-4c1a-8e0f-6a7d3c9b1e42")
_US: Final = 1_000_000


class ActionRunner:
    """Executes alert rules' automatic actions against the registry and the trainer."""

    def __init__(
        self,
        registry: RegistryClient,
        trainer_channel: grpc.aio.Channel,
        store: MonitorStore,
        profiles: VersionProfiles,
        workers: WorkerThreads,
        *,
        call_timeout: timedelta = timedelta(seconds=30),
        min_labelled_predictions: int = MIN_LABELLED_PREDICTIONS,
    ) -> None:
        self._registry = registry
        self._trainer = trainer_service_pb2_grpc.TrainerServiceStub(trainer_channel)
        self._store = store
        self._profiles = profiles
        self._workers = workers
        self._timeout = call_timeout.total_seconds()
        self._min_labelled = min_labelled_predictions

    async def check_training_job(self, name: str) -> None:
        """NOT_FOUND when the trainer has no job ``name`` (a rule's retraining
        would reuse it). A trainer that cannot be asked now does not block the
        rule: its action fails, and says why, when it runs."""
        try:
            await self._trainer.GetTrainingJob(
                trainer_rpc.GetTrainingJobRequest(name=name), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            failure = from_rpc_error(error)
            if isinstance(failure, NotFoundError | InvalidArgumentError):
                raise failure from None
            logger.warning("could not check %s with the trainer: %s", name, failure.message)

    async def run(self, alert: pb.Alert, action: pb.AlertAction) -> pb.ActionExecution:
        """Execute ``action`` for ``alert``: the execution, SUCCEEDED, FAILED or
        DENIED, with its start and end time, what it changed and why."""
        execution = pb.ActionExecution(kind=_kind(action))
        execution.start_time.GetCurrentTime()
        kind = pb.ActionKind.Name(execution.kind).removeprefix("ACTION_KIND_").lower()
        try:
            if action.HasField("rollback"):
                done = await self._rollback(alert, action.rollback)
            elif action.HasField("retrain"):
                done = await self._retrain(alert, action)
            else:
                raise _ActionFailedError("the action names neither a rollback nor a retraining")
        except _ActionFailedError as failure:
            execution.state = pb.ACTION_STATE_FAILED
            execution.message = failure.message
        except _CallFailedError as failure:
            decision = _refusal_decision(failure.error)
            execution.state = pb.ACTION_STATE_FAILED if decision is None else pb.ACTION_STATE_DENIED
            execution.decision = decision or ""
            execution.message = f"{failure.step}: {failure.error.message}"
        except Exception as error:  # never raise for a failed action
            logger.exception("%s action for %s failed unexpectedly", kind, alert.name)
            execution.state = pb.ACTION_STATE_FAILED
            execution.message = f"the action failed unexpectedly ({type(error).__name__})"
        else:
            execution.state = pb.ACTION_STATE_SUCCEEDED
            execution.resources.extend(done.resources)
            execution.decision = done.decision
            execution.message = done.message
        execution.end_time.GetCurrentTime()
        logger.info(
            "%s action for %s (%s): %s: %s",
            kind,
            alert.name,
            alert.model_version,
            pb.ActionState.Name(execution.state).removeprefix("ACTION_STATE_"),
            execution.message,
        )
        return execution

    # -- rollback ------------------------------------------------------------------

    async def _rollback(self, alert: pb.Alert, action: pb.RollbackAction) -> _Done:
        alias = action.alias or DEFAULT_ALIAS
        version = alert.model_version
        model = model_of(version)
        target = f"{model}@{alias}"
        with _step(f"reading {target}"):
            current = await self._registry.alias(model, alias)
        if current is None:
            raise _ActionFailedError(f"{model} has no alias {alias!r}; nothing was rolled back")
        if current.version != version:
            raise _ActionFailedError(
                f"{target} points at {current.version}, not at the alert's version "
                f"{version}; nothing was rolled back"
            )
        previous = current.previous_version
        if not previous or previous == version:
            raise _ActionFailedError(f"{target} has no earlier version to go back to")
        reason = _cap_utf8(f"rollback: {alert.name}: {alert.summary}", MAX_REASON_BYTES)
        with _step(f"moving {target} back to {previous}"):
            moved = await self._registry.set_alias(
                model, alias, previous, reason=reason, expected_version=version
            )
        return _Done(
            resources=[target],
            decision=moved.decision,
            message=f"{target} moved back from {version} to {moved.version}",
        )

    # -- retraining ------------------------------------------------------------------

    async def _retrain(self, alert: pb.Alert, action: pb.AlertAction) -> _Done:
        retrain = action.retrain
        version = alert.model_version
        window = (
            retrain.labelled_data_window.ToTimedelta()
            if retrain.HasField("labelled_data_window")
            else DEFAULT_LABELLED_DATA_WINDOW
        )
        if window < MIN_LABELLED_DATA_WINDOW:
            raise _ActionFailedError(
                f"labelled_data_window is {window}; it must be at least 1 hour"
            )
        job_name = retrain.training_job
        if not job_name:
            with _step(f"reading {version}"):
                registered = await self._registry.version(version)
            job_name = registered.lineage.training_job
            if not job_name:
                raise _ActionFailedError(
                    f"no training job to reuse: the action names none and {version} "
                    "has no lineage.training_job"
                )
        with _step(f"reading {job_name}"):
            original = (
                await self._trainer.GetTrainingJob(
                    trainer_rpc.GetTrainingJobRequest(name=job_name), timeout=self._timeout
                )
            ).training_job
        dataset_name = original.spec.data.dataset
        with _step(f"reading {dataset_name}, the dataset of {job_name}"):
            dataset = (
                await self._trainer.GetDataset(
                    trainer_rpc.GetDatasetRequest(name=dataset_name), timeout=self._timeout
                )
            ).dataset
        target = _target_schema(dataset, original.spec.data)
        with _step(f"reading the profile of {version}"):
            profile = await self._profiles.get(version)
        # Up to the alert's opening, so that running the action again reads the same rows.
        end_us = (
            alert.open_time.ToMicroseconds()
            if alert.HasField("open_time")
            else time.time_ns() // 1000
        )
        start_us = end_us - int(window.total_seconds() * _US)
        rows = await self._workers.run(
            self._store.window_rows,
            version,
            time_range=(start_us, end_us),
            numerical_columns=len(profile.schema.numerical),
            categorical_columns=len(profile.schema.categorical),
        )
        built = await self._workers.run(
            _build_training_file, profile.schema, profile.reference_data, rows, target
        )
        if built.prediction_rows < self._min_labelled:
            raise _ActionFailedError(
                f"too few labelled predictions to retrain {version}: "
                f"{built.prediction_rows} in the last {_words(window)}"
                + (
                    f" (and {built.prediction_skipped} with a missing feature or an unknown class)"
                    if built.prediction_skipped
                    else ""
                )
                + f", at least {self._min_labelled} are needed"
            )
        key = _action_key(alert, action)
        new_dataset = await self._upload(alert, key, built, dataset, job_name, window)
        job = await self._create_job(alert, key, original, new_dataset.name)
        return _Done(
            resources=[new_dataset.name, job.name],
            decision="",
            message=(
                f"{job.name} retrains the spec of {job_name} on {new_dataset.name}: "
                f"{built.reference_rows} reference rows and {built.prediction_rows} labelled "
                f"predictions of the last {_words(window)}"
                + (
                    f"; {built.skipped} labelled rows with a missing feature or an unknown "
                    "class left out"
                    if built.skipped
                    else ""
                )
            ),
        )

    async def _upload(
        self,
        alert: pb.Alert,
        key: str,
        built: _TrainingFile,
        original: trainer_pb.Dataset,
        job_name: str,
        window: timedelta,
    ) -> trainer_pb.Dataset:
        dataset_id = f"retrain-{key}"
        metadata = trainer_rpc.CreateDatasetMetadata(
            dataset_id=dataset_id,
            dataset=trainer_pb.Dataset(
                display_name=f"Retraining data for {alert.model_version}"[:MAX_DISPLAY_NAME_CHARS],
                description=(
                    f"The labelled reference rows of {alert.model_version} "
                    f"({built.reference_rows}) and its labelled predictions of the "
                    f"{_words(window)} before {alert.name} opened ({built.prediction_rows}), "
                    f"in the schema of {original.name} (the dataset of {job_name})."
                ),
                format=trainer_pb.DATASET_FORMAT_NPZ,
                modality=original.modality,
                task=original.task,
                feature_names=built.feature_names,
                class_names=built.class_names,
            ),
            sha256=hashlib.sha256(built.data).hexdigest(),
            size_bytes=len(built.data),
            request_id=_request_id(key, "dataset"),
        )

        async def requests() -> AsyncIterator[trainer_rpc.CreateDatasetRequest]:
            yield trainer_rpc.CreateDatasetRequest(metadata=metadata)
            for start in range(0, len(built.data), UPLOAD_CHUNK_BYTES):
                yield trainer_rpc.CreateDatasetRequest(
                    chunk=built.data[start : start + UPLOAD_CHUNK_BYTES]
                )

        name = f"datasets/{dataset_id}"
        try:
            with _step(f"uploading {name}"):
                reply = await self._trainer.CreateDataset(requests(), timeout=self._timeout)
            return reply.dataset
        except _CallFailedError as failure:
            if not isinstance(failure.error, AlreadyExistsError):
                raise
        # An earlier run of this action for this alert uploaded it already.
        with _step(f"reading {name}, uploaded before"):
            reply_get = await self._trainer.GetDataset(
                trainer_rpc.GetDatasetRequest(name=name), timeout=self._timeout
            )
        return reply_get.dataset

    async def _create_job(
        self, alert: pb.Alert, key: str, original: trainer_pb.TrainingJob, dataset: str
    ) -> trainer_pb.TrainingJob:
        spec = trainer_pb.TrainingJobSpec()
        spec.CopyFrom(original.spec)
        spec.data.dataset = dataset
        spec.data.ClearField("generator_args")
        del spec.data.additional_datasets[:]
        ours = {
            ALERT_LABEL: alert.name.removeprefix("alerts/")[:MAX_LABEL_VALUE_CHARS],
            RETRAINED_FROM_LABEL: original.name.removeprefix("trainingJobs/")[
                :MAX_LABEL_VALUE_CHARS
            ],
        }
        kept = [(k, v) for k, v in original.labels.items() if k not in ours]
        labels = dict(kept[: MAX_JOB_LABELS - len(ours)]) | ours
        job_id = f"retrain-{key}"
        request = trainer_rpc.CreateTrainingJobRequest(
            training_job_id=job_id,
            training_job=trainer_pb.TrainingJob(
                display_name=f"Retraining of {alert.model_version}"[:MAX_DISPLAY_NAME_CHARS],
                spec=spec,
                labels=labels,
            ),
            request_id=_request_id(key, "training-job"),
        )
        name = f"trainingJobs/{job_id}"
        try:
            with _step(f"creating {name}"):
                reply = await self._trainer.CreateTrainingJob(request, timeout=self._timeout)
            return reply.training_job
        except _CallFailedError as failure:
            if not isinstance(failure.error, AlreadyExistsError):
                raise
        # An earlier run of this action for this alert created it already.
        with _step(f"reading {name}, created before"):
            reply_get = await self._trainer.GetTrainingJob(
                trainer_rpc.GetTrainingJobRequest(name=name), timeout=self._timeout
            )
        return reply_get.training_job


# -- the training file ---------------------------------------------------------------


@dataclass(frozen=True)
class _TargetSchema:
    """What the original job's dataset looks like to the trainer."""

    dataset: str
    feature_names: tuple[str, ...]
    """Tabular only; empty for images."""
    class_names: tuple[str, ...]
    example_shape: tuple[int, ...]
    image: bool


@dataclass(frozen=True, eq=False)
class _TrainingFile:
    """An NPZ file (``x``, ``y``) in the target schema, and what went into it."""

    data: bytes
    feature_names: list[str]
    class_names: list[str]
    reference_rows: int
    prediction_rows: int
    skipped: int
    """Labelled rows left out: a missing or non-numeric feature, or a label
    that is none of the dataset's classes."""
    prediction_skipped: int
    """The labelled predictions among them."""


def _target_schema(dataset: trainer_pb.Dataset, data: trainer_pb.DatasetSpec) -> _TargetSchema:
    """The schema a dataset replacing ``dataset`` in a job's ``data`` must
    have. A generator's schema follows the job's own arguments: its features
    are ``feature_{i}`` and its classes ``class_{k}``."""
    feature_names = tuple(dataset.feature_names)
    class_names = tuple(dataset.class_names)
    shape = tuple(int(d) for d in dataset.example_shape)
    if dataset.source == trainer_pb.DATASET_SOURCE_GENERATOR:
        arguments = {**dict(dataset.generator_args), **dict(data.generator_args)}
        counts = arguments.get("num_features"), arguments.get("num_classes")
        if not all(isinstance(c, float) and c.is_integer() and c > 0 for c in counts):
            raise _ActionFailedError(
                f"cannot tell the schema of {dataset.name} with the job's arguments"
            )
        features, classes = (int(c) for c in counts if isinstance(c, float))
        feature_names = tuple(f"feature_{i}" for i in range(features))
        class_names = tuple(f"class_{k}" for k in range(classes))
        shape = (features,)
    image = dataset.modality == trainer_pb.DATA_MODALITY_IMAGE
    if not class_names or (not image and not feature_names) or (image and not shape):
        raise _ActionFailedError(f"{dataset.name} does not describe its features and classes")
    return _TargetSchema(dataset.name, feature_names, class_names, shape, image)


def _build_training_file(
    schema: FeatureSchema,
    reference: ReferenceData | None,
    rows: WindowRows,
    target: _TargetSchema,
) -> _TrainingFile:
    """The labelled reference rows then the labelled predictions (oldest
    first), with the version's features put in the target's order: by name
    when the version has every feature the dataset names, otherwise by
    position when the counts agree; categorical values must be numbers."""
    columns = _column_map(schema, target)
    successful = rows.status_codes == 0
    order = np.argsort(rows.times_us[successful], kind="stable")
    parts = [
        _labelled(columns, reference.numerical, reference.categorical, reference.labels, target)
        if reference is not None
        else _empty(target),
        _labelled(
            columns,
            rows.numerical[order],
            rows.categorical[order],
            rows.labels[order],
            target,
        ),
    ]
    features = np.concatenate([p.features for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    if target.image:
        features = features.reshape(len(features), *target.example_shape)
    buffer = io.BytesIO()
    np.savez(buffer, x=features, y=labels)
    return _TrainingFile(
        data=buffer.getvalue(),
        feature_names=list(target.feature_names) if not target.image else [],
        class_names=list(target.class_names),
        reference_rows=len(parts[0].labels),
        prediction_rows=len(parts[1].labels),
        skipped=parts[0].skipped + parts[1].skipped,
        prediction_skipped=parts[1].skipped,
    )


@dataclass(frozen=True)
class _Column:
    categorical: bool
    index: int


@dataclass(frozen=True, eq=False)
class _Part:
    features: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    skipped: int


def _column_map(schema: FeatureSchema, target: _TargetSchema) -> list[_Column]:
    """Where each of the target's features comes from in the version's rows."""
    numerical = {schema.features[p].name: i for i, p in enumerate(schema.numerical)}
    categorical = {schema.features[p].name: i for i, p in enumerate(schema.categorical)}
    if target.image:
        width = math.prod(target.example_shape)
        if len(numerical) != width or categorical:
            raise _ActionFailedError(
                f"{target.dataset} holds images of {width} values; the version's rows have "
                f"{len(numerical)} numerical and {len(categorical)} categorical features"
            )
        return [_Column(False, i) for i in range(width)]
    missing = [n for n in target.feature_names if n not in numerical and n not in categorical]
    if not missing:
        return [
            _Column(False, numerical[n]) if n in numerical else _Column(True, categorical[n])
            for n in target.feature_names
        ]
    if not categorical and len(numerical) == len(target.feature_names):
        return [_Column(False, i) for i in range(len(numerical))]
    raise _ActionFailedError(
        f"the version's features do not match those of {target.dataset}: it lacks "
        + ", ".join(repr(n) for n in missing[:5])
        + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    )


def _labelled(
    columns: Sequence[_Column],
    numerical: npt.NDArray[np.float64],
    categorical: npt.NDArray[np.str_],
    labels: npt.NDArray[np.int64],
    target: _TargetSchema,
) -> _Part:
    """The rows that have a label, in the target's columns; rows whose label
    is no class of the target or whose features are incomplete are skipped."""
    labelled = labels >= 0
    features = np.empty((int(labelled.sum()), len(columns)), dtype=np.float64)
    for j, column in enumerate(columns):
        if column.categorical:
            features[:, j] = [_number(v) for v in categorical[labelled, column.index]]
        else:
            features[:, j] = numerical[labelled, column.index]
    chosen = labels[labelled].astype(np.int64)
    usable = np.isfinite(features).all(axis=1) & (chosen < len(target.class_names))
    return _Part(features[usable], chosen[usable], int((~usable).sum()))


def _empty(target: _TargetSchema) -> _Part:
    width = math.prod(target.example_shape) if target.image else len(target.feature_names)
    return _Part(np.empty((0, width)), np.empty(0, dtype=np.int64), 0)


def _number(value: str) -> float:
    try:
        return float(value) if value else math.nan
    except ValueError:
        return math.nan


# -- helpers ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Done:
    resources: list[str]
    decision: str
    message: str


class _ActionFailedError(Exception):
    """The action cannot be done; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _CallFailedError(Exception):
    """A call the action made failed."""

    def __init__(self, step: str, error: ConveyorError) -> None:
        super().__init__(f"{step}: {error.message}")
        self.step = step
        self.error = error


@contextmanager
def _step(step: str) -> Iterator[None]:
    """Report a failed registry or trainer call as ``step`` failing."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise _CallFailedError(step, from_rpc_error(error)) from None
    except ConveyorError as error:
        raise _CallFailedError(step, error) from None


def _refusal_decision(error: ConveyorError) -> str | None:
    """The decision (``decisions/{id}``, or "" when none was named) of a
    policy refusal: the caller was denied, or a promotion gate refused; None
    for any other failure (a concurrent change among them)."""
    if isinstance(error, AbortedError):
        return None
    refused = isinstance(error, PermissionDeniedError) or (
        isinstance(error, FailedPreconditionError) and error.reason == PROMOTION_REFUSED
    )
    if not refused:
        return None
    decision = error.metadata.get("decision") or error.metadata.get("decision_id", "")
    if decision and not decision.startswith("decisions/"):
        decision = f"decisions/{decision}"
    return decision


def _kind(action: pb.AlertAction) -> pb.ActionKind.ValueType:
    if action.HasField("rollback"):
        return pb.ACTION_KIND_ROLLBACK
    if action.HasField("retrain"):
        return pb.ACTION_KIND_RETRAIN
    return pb.ACTION_KIND_UNSPECIFIED


def _action_key(alert: pb.Alert, action: pb.AlertAction) -> str:
    """20 hex digits that stand for this action of this alert."""
    digest = hashlib.sha256(alert.name.encode())
    digest.update(b"\0")
    digest.update(action.SerializeToString(deterministic=True))
    return digest.hexdigest()[:20]


def _request_id(key: str, call: str) -> str:
    return str(uuid.uuid5(_REQUEST_NAMESPACE, f"{key}/{call}"))


def _cap_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode(errors="ignore")


def _words(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds % size == 0 and seconds >= size:
            count = seconds // size
            return f"{count} {unit}" + ("s" if count != 1 else "")
    return f"{seconds} seconds"


__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_LABELLED_DATA_WINDOW",
    "MIN_LABELLED_PREDICTIONS",
    "ActionRunner",
]
