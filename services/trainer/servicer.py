"""``conveyor.trainer.v1.TrainerService``: datasets, training jobs and sweeps.

Transport only: parse and validate requests, run blocking work in threads,
hand jobs to the :class:`~.jobs.JobManager`, stream watch events from the
:class:`~.watch.TrainingWatchHub`. Errors are raised as ConveyorError and
mapped to statuses by the shared interceptor; a refused call changes nothing.
The :class:`~.sweeps.SweepManager` runs the sweeps.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

from conveyor.registry.v1 import resources_pb2 as registry_pb
from conveyor.services.trainer import datasets, search_space, sweeps
from conveyor.services.trainer.datasets import DatasetSchema
from conveyor.services.trainer.jobs import JobManager, uploaded_datasets
from conveyor.services.trainer.registration import Registrar
from conveyor.services.trainer.specs import validate_training_spec
from conveyor.services.trainer.store import TrainerStore, request_hash, state_name, timestamp
from conveyor.services.trainer.sweep_store import SweepStore
from conveyor.services.trainer.sweeps import SweepManager
from conveyor.services.trainer.uploads import load_uploaded
from conveyor.services.trainer.watch import SweepWatchHub, TrainingWatchHub
from conveyor.shared import names, pagination
from conveyor.shared.auth import caller_principal
from conveyor.shared.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    ResourceExhaustedError,
    invalid_field,
    raise_if_any,
)
from conveyor.shared.filtering import FieldKind, FilterField, matches, parse_filter
from conveyor.shared.workers import WorkerThreads
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc
from conveyor.trainer.v1 import trainer_service_pb2_grpc

KIB: Final = 1024
MAX_CHUNK_BYTES: Final = 2 * 1024 * KIB
MAX_DISPLAY_NAME_CHARS: Final = 128
MAX_DESCRIPTION_BYTES: Final = 16 * KIB
MAX_MODEL_CARD_BYTES: Final = 256 * KIB
MAX_LABELS: Final = 64
MAX_LABEL_VALUE_CHARS: Final = 63
DEFAULT_PROGRESS_INTERVAL_S: Final = 0.5
MIN_PROGRESS_INTERVAL_S: Final = 0.05

_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}\Z")


def _enum_names(values: Sequence[str], prefix: str) -> frozenset[str]:
    return frozenset(v.removeprefix(prefix) for v in values if not v.endswith("UNSPECIFIED"))


DATASET_FILTERS: Final = {
    "source": FilterField(FieldKind.ENUM, _enum_names(pb.DatasetSource.keys(), "DATASET_SOURCE_")),
    "modality": FilterField(FieldKind.ENUM, _enum_names(pb.DataModality.keys(), "DATA_MODALITY_")),
    "task": FilterField(FieldKind.ENUM, _enum_names(registry_pb.TaskType.keys(), "TASK_TYPE_")),
}
SWEEP_FILTERS: Final = {
    "state": FilterField(FieldKind.ENUM, _enum_names(pb.JobState.keys(), "JOB_STATE_")),
    "created_by": FilterField(FieldKind.STRING),
    "labels.": FilterField(FieldKind.MAP),
}
JOB_FILTERS: Final = {
    "state": FilterField(FieldKind.ENUM, _enum_names(pb.JobState.keys(), "JOB_STATE_")),
    "spec.data.dataset": FilterField(FieldKind.STRING),
    "spec.architecture.name": FilterField(FieldKind.STRING),
    "spec.registration.model": FilterField(FieldKind.STRING),
    "sweep_job": FilterField(FieldKind.STRING),
    "created_by": FilterField(FieldKind.STRING),
    "labels.": FilterField(FieldKind.MAP),
    "create_time": FilterField(FieldKind.TIMESTAMP),
}


class TrainerServicer(trainer_service_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self,
        store: TrainerStore,
        manager: JobManager,
        hub: TrainingWatchHub,
        sweeps: SweepManager,
        sweep_store: SweepStore,
        sweep_hub: SweepWatchHub,
        workers: WorkerThreads,
        registrar: Registrar,
        *,
        max_dataset_bytes: int,
        max_queued_jobs: int,
        cuda_available: bool,
    ) -> None:
        self._store = store
        self._manager = manager
        self._hub = hub
        self._sweeps = sweeps
        self._sweep_store = sweep_store
        self._sweep_hub = sweep_hub
        self._workers = workers
        self._registrar = registrar
        self._max_dataset_bytes = max_dataset_bytes
        self._max_queued_jobs = max_queued_jobs
        self._cuda_available = cuda_available
        self._started = timestamp(datetime.now(UTC))
        self._builtins: dict[str, pb.Dataset] | None = None
        self._builtins_lock = asyncio.Lock()

    # -- datasets --------------------------------------------------------------

    async def ListDatasets(self, request: rpc.ListDatasetsRequest, context: Any) -> Any:
        size = pagination.page_size(request.page_size)
        restrictions = parse_filter(request.filter, DATASET_FILTERS)
        fingerprint = pagination.fingerprint(request.filter)
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        builtins = await self._builtin_datasets()
        uploads = await self._workers.run(self._store.list_datasets)
        every = sorted([*builtins.values(), *uploads], key=lambda d: d.name)
        selected = [d for d in every if matches(restrictions, partial(_dataset_field, d))]
        page = selected[cursor.offset : cursor.offset + size]
        more = len(selected) > cursor.offset + size
        return rpc.ListDatasetsResponse(
            datasets=page,
            next_page_token=pagination.next_page_token(more, cursor, size, fingerprint),
        )

    async def GetDataset(self, request: rpc.GetDatasetRequest, context: Any) -> Any:
        dataset_id = names.parse_resource_name(request.name, "datasets")
        if datasets.is_builtin(request.name):
            return rpc.GetDatasetResponse(dataset=(await self._builtin_datasets())[request.name])
        dataset = await self._workers.run(self._store.get_dataset, dataset_id)
        return rpc.GetDatasetResponse(dataset=dataset)

    async def CreateDataset(
        self, request_iterator: AsyncIterator[rpc.CreateDatasetRequest], context: Any
    ) -> Any:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or not first.HasField("metadata"):
            raise invalid_field("metadata", "the first message must carry the metadata")
        metadata = first.metadata
        dataset_id = metadata.dataset_id
        raise_if_any(_upload_violations(metadata), "invalid dataset upload")
        if metadata.size_bytes > self._max_dataset_bytes:
            raise ResourceExhaustedError(
                f"the file is {metadata.size_bytes} bytes; the limit is {self._max_dataset_bytes}",
                reason="DATASET_TOO_LARGE",
                metadata={"max_dataset_bytes": str(self._max_dataset_bytes)},
            )
        fingerprint = request_hash(metadata)
        done = await self._workers.run(
            self._store.find_request, metadata.request_id, "CreateDataset", fingerprint
        )
        if done is not None:  # a retry of a finished upload: no need for the bytes
            dataset = await self._workers.run(self._store.get_dataset, done.split("/", 1)[1])
            return rpc.CreateDatasetResponse(dataset=dataset)
        name = f"datasets/{dataset_id}"
        if await self._workers.run(self._store.dataset_exists, dataset_id):
            raise _exists(name)
        data = await self._receive(requests, metadata)
        loaded = await self._workers.run(load_uploaded, data, metadata.dataset, name=name)
        try:
            blob = await self._workers.run(self._store.blobs.put, data)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhaustedError(
                    "the trainer's data directory is full", reason="STORAGE_FULL"
                ) from None
            raise
        described = loaded.describe()
        described.display_name = metadata.dataset.display_name
        described.description = metadata.dataset.description
        described.format = metadata.dataset.format
        described.label_column = metadata.dataset.label_column
        described.size_bytes = len(data)
        described.created_by = caller_principal(context)
        upload = pb.Dataset(
            format=metadata.dataset.format,
            modality=metadata.dataset.modality,
            task=metadata.dataset.task,
            label_column=metadata.dataset.label_column,
            feature_names=metadata.dataset.feature_names,
            class_names=metadata.dataset.class_names,
        )
        dataset = await self._workers.run(
            self._store.create_dataset,
            dataset_id,
            described,
            upload,
            sha256=blob.sha256,
            request_id=metadata.request_id,
            fingerprint=fingerprint,
        )
        return rpc.CreateDatasetResponse(dataset=dataset)

    async def _receive(
        self, requests: AsyncIterator[rpc.CreateDatasetRequest], metadata: rpc.CreateDatasetMetadata
    ) -> bytes:
        """The file's bytes, hashed as they arrive and checked against the
        declared size and digest."""
        received = bytearray()
        hasher = hashlib.sha256()
        async for message in requests:
            if not message.HasField("chunk"):
                raise invalid_field("chunk", "every message after the first carries a chunk")
            if len(message.chunk) > MAX_CHUNK_BYTES:
                raise invalid_field("chunk", f"at most {MAX_CHUNK_BYTES} bytes each")
            if len(received) + len(message.chunk) > metadata.size_bytes:
                raise invalid_field("metadata.size_bytes", "more bytes arrived than were declared")
            await self._workers.run(hasher.update, message.chunk)
            received += message.chunk
        if len(received) != metadata.size_bytes:
            raise invalid_field(
                "metadata.size_bytes",
                f"declared {metadata.size_bytes} bytes but {len(received)} arrived",
            )
        if hasher.hexdigest() != metadata.sha256:
            raise InvalidArgumentError(
                "the file does not match the declared sha256",
                violations=[FieldViolation("metadata.sha256", "does not match the file")],
                reason="DIGEST_MISMATCH",
            )
        return bytes(received)

    async def DeleteDataset(self, request: rpc.DeleteDatasetRequest, context: Any) -> Any:
        dataset_id = names.parse_resource_name(request.name, "datasets")
        if datasets.is_builtin(request.name):
            raise FailedPreconditionError(
                f"{request.name} is built in; only uploaded datasets can be deleted",
                reason="BUILTIN_DATASET",
                metadata={"name": request.name},
            )
        await self._workers.run(self._store.delete_dataset, dataset_id)
        return rpc.DeleteDatasetResponse()

    async def _builtin_datasets(self) -> dict[str, pb.Dataset]:
        if self._builtins is None:
            async with self._builtins_lock:
                if self._builtins is None:
                    described = await self._workers.run(datasets.builtin_datasets)
                    for dataset in described:
                        dataset.create_time.CopyFrom(self._started)
                    self._builtins = {d.name: d for d in described}
        return self._builtins

    # -- training jobs ---------------------------------------------------------

    async def CreateTrainingJob(self, request: rpc.CreateTrainingJobRequest, context: Any) -> Any:
        job_id = request.training_job_id or f"job-{uuid.uuid4().hex[:12]}"
        names.check_id(job_id, field="training_job_id")
        fingerprint = request_hash(request)
        if not request.validate_only:
            done = await self._workers.run(
                self._store.find_request, request.request_id, "CreateTrainingJob", fingerprint
            )
            if done is not None:
                job = await self._manager.get(done.removeprefix("trainingJobs/"))
                return rpc.CreateTrainingJobResponse(training_job=job)
        job = await self._validated_job(request, job_id, caller_principal(context))
        if request.validate_only:
            return rpc.CreateTrainingJobResponse(training_job=job)
        created = await self._workers.run(
            self._store.create_job,
            job,
            uploaded=uploaded_datasets(job.spec),
            max_queued=self._max_queued_jobs,
            request_id=request.request_id,
            fingerprint=fingerprint,
        )
        self._manager.notify()
        return rpc.CreateTrainingJobResponse(training_job=created)

    async def _validated_job(
        self, request: rpc.CreateTrainingJobRequest, job_id: str, principal: str
    ) -> pb.TrainingJob:
        """The job to queue, once every part of the request checked out."""
        given = request.training_job
        field = "training_job.spec"
        violations = list(_job_violations(given))
        if not given.HasField("spec"):
            violations.append(FieldViolation(field, "required: what to train and how"))
            raise_if_any(violations, "invalid training job")
        await self._validated_spec(given.spec, field, violations)
        created = timestamp(datetime.now(UTC))
        return pb.TrainingJob(
            name=f"trainingJobs/{job_id}",
            display_name=given.display_name,
            spec=given.spec,
            labels=given.labels,
            state=pb.JOB_STATE_QUEUED,
            create_time=created,
            update_time=created,
            created_by=principal,
        )

    async def _validated_spec(
        self,
        spec: pb.TrainingJobSpec,
        field: str,
        violations: list[FieldViolation],
        *,
        refusal: str = "invalid training job",
    ) -> DatasetSchema:
        """The schema of the data ``spec`` trains on, once the spec (and the
        ``violations`` found before it) checked out; its registration target
        must exist."""
        violations += _dataset_name_violations(spec.data, f"{field}.data")
        violations += _registration_violations(spec.registration, f"{field}.registration")
        if any(v.field.startswith(f"{field}.data.") for v in violations):
            raise_if_any(violations, refusal)
        try:
            schema = await self._data_schema(spec.data, f"{field}.data")
        except InvalidArgumentError as error:
            raise_if_any([*violations, *error.violations], error.message)
            raise
        try:
            await self._workers.run(
                validate_training_spec,
                spec,
                schema,
                cuda_available=self._cuda_available,
                field=field,
            )
        except InvalidArgumentError as error:
            violations += error.violations
        raise_if_any(violations, refusal)
        if spec.registration.model:
            await self._registrar.check_target(spec.registration.model)
        return schema

    async def _data_schema(self, data: pb.DatasetSpec, field: str) -> DatasetSchema:
        """The schema of the data ``data`` names (all datasets together):
        NOT_FOUND for an unknown dataset, INVALID_ARGUMENT for bad generator
        arguments or additional datasets that do not match."""
        builtins = await self._builtin_datasets()
        if data.dataset == datasets.SYNTHETIC and data.generator_args.fields:
            schema = await self._workers.run(
                datasets.builtin_schema, data.dataset, data.generator_args, field=field
            )
            primary = None
        else:
            primary = await self._describe(data.dataset, builtins)
            schema = _schema(primary)
        total = schema.num_examples
        violations = []
        for index, extra_name in enumerate(data.additional_datasets):
            extra = await self._describe(extra_name, builtins)
            total += extra.example_count
            mismatch = _mismatch(primary, schema, extra)
            if mismatch:
                violations.append(FieldViolation(f"{field}.additional_datasets[{index}]", mismatch))
        raise_if_any(violations, "additional datasets do not match")
        return DatasetSchema(schema.example_shape, schema.num_classes, schema.modality, total)

    async def _describe(self, name: str, builtins: dict[str, pb.Dataset]) -> pb.Dataset:
        if name in builtins:
            return builtins[name]
        return await self._workers.run(
            self._store.get_dataset, names.parse_resource_name(name, "datasets")
        )

    async def GetTrainingJob(self, request: rpc.GetTrainingJobRequest, context: Any) -> Any:
        job_id = names.parse_resource_name(request.name, "trainingJobs")
        return rpc.GetTrainingJobResponse(training_job=await self._manager.get(job_id))

    async def ListTrainingJobs(self, request: rpc.ListTrainingJobsRequest, context: Any) -> Any:
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
        return rpc.ListTrainingJobsResponse(
            # Running jobs as they are now (the store has them as of their last epoch).
            training_jobs=[self._manager.overlay(job) for job in page.items],
            next_page_token=pagination.next_page_token(page.has_more, cursor, size, fingerprint),
        )

    async def CancelTrainingJob(self, request: rpc.CancelTrainingJobRequest, context: Any) -> Any:
        job_id = names.parse_resource_name(request.name, "trainingJobs")
        return rpc.CancelTrainingJobResponse(training_job=await self._manager.cancel(job_id))

    async def WatchTrainingJob(
        self, request: rpc.WatchTrainingJobRequest, context: Any
    ) -> AsyncIterator[rpc.WatchTrainingJobResponse]:
        job_id = names.parse_resource_name(request.name, "trainingJobs")
        interval = request.progress_interval
        if interval.seconds < 0 or interval.nanos < 0:
            raise invalid_field("progress_interval", "must not be negative; 0 means 500 ms")
        seconds = interval.ToTimedelta().total_seconds() or DEFAULT_PROGRESS_INTERVAL_S
        async for response in self._hub.watch(
            request.name,
            max(seconds, MIN_PROGRESS_INTERVAL_S),
            partial(self._manager.get, job_id),
        ):
            yield response

    # -- sweep jobs --------------------------------------------------------------

    async def CreateSweepJob(self, request: rpc.CreateSweepJobRequest, context: Any) -> Any:
        sweep_id = request.sweep_job_id or f"sweep-{uuid.uuid4().hex[:12]}"
        names.check_id(sweep_id, field="sweep_job_id")
        fingerprint = request_hash(request)
        if not request.validate_only:
            done = await self._workers.run(
                self._store.find_request, request.request_id, "CreateSweepJob", fingerprint
            )
            if done is not None:
                sweep = await self._sweeps.get(done.removeprefix("sweepJobs/"))
                return rpc.CreateSweepJobResponse(sweep_job=sweep)
        sweep = await self._validated_sweep(request, sweep_id, caller_principal(context))
        if request.validate_only:
            return rpc.CreateSweepJobResponse(sweep_job=sweep)
        created = await self._workers.run(
            self._sweep_store.create_sweep,
            sweep,
            request_id=request.request_id,
            fingerprint=fingerprint,
        )
        self._sweeps.poke(created.name)
        return rpc.CreateSweepJobResponse(sweep_job=created)

    async def _validated_sweep(
        self, request: rpc.CreateSweepJobRequest, sweep_id: str, principal: str
    ) -> pb.SweepJob:
        """The sweep to create, once its spec and every trial's checked out."""
        given = request.sweep_job
        field = "sweep_job.spec"
        refusal = "invalid sweep job"
        violations = [
            *_text("sweep_job.display_name", given.display_name, chars=MAX_DISPLAY_NAME_CHARS),
            *_labels("sweep_job.labels", given.labels),
        ]
        spec = given.spec
        if not spec.HasField("base_spec"):
            violations.append(
                FieldViolation(f"{field}.base_spec", "required: the spec every trial starts from")
            )
            raise_if_any(violations, refusal)
        violations += sweeps.sweep_violations(spec, field)
        parameters = search_space.search_space(spec, field, violations)
        schema = await self._validated_spec(
            spec.base_spec, f"{field}.base_spec", violations, refusal=refusal
        )
        violations += sweeps.objective_violations(spec, schema, field)
        raise_if_any(violations, refusal)
        violations += await self._workers.run(
            sweeps.trial_violations,
            spec,
            parameters,
            schema,
            cuda_available=self._cuda_available,
            field=field,
        )
        raise_if_any(violations, refusal)
        created = timestamp(datetime.now(UTC))
        return pb.SweepJob(
            name=f"sweepJobs/{sweep_id}",
            display_name=given.display_name,
            spec=spec,
            labels=given.labels,
            state=pb.JOB_STATE_QUEUED,
            create_time=created,
            update_time=created,
            created_by=principal,
        )

    async def GetSweepJob(self, request: rpc.GetSweepJobRequest, context: Any) -> Any:
        sweep_id = names.parse_resource_name(request.name, "sweepJobs")
        return rpc.GetSweepJobResponse(sweep_job=await self._sweeps.get(sweep_id))

    async def ListSweepJobs(self, request: rpc.ListSweepJobsRequest, context: Any) -> Any:
        size = pagination.page_size(request.page_size)
        restrictions = parse_filter(request.filter, SWEEP_FILTERS)
        descending = pagination.newest_first(request.order_by)
        fingerprint = pagination.fingerprint(request.filter, request.order_by)
        cursor = pagination.decode_page_token(request.page_token, fingerprint)
        page = await self._workers.run(
            self._sweep_store.list_sweeps,
            restrictions,
            _sweep_field,
            descending=descending,
            offset=cursor.offset,
            limit=size,
        )
        return rpc.ListSweepJobsResponse(
            sweep_jobs=page.items,
            next_page_token=pagination.next_page_token(page.has_more, cursor, size, fingerprint),
        )

    async def CancelSweepJob(self, request: rpc.CancelSweepJobRequest, context: Any) -> Any:
        sweep_id = names.parse_resource_name(request.name, "sweepJobs")
        return rpc.CancelSweepJobResponse(sweep_job=await self._sweeps.cancel(sweep_id))

    async def WatchSweepJob(
        self, request: rpc.WatchSweepJobRequest, context: Any
    ) -> AsyncIterator[rpc.WatchSweepJobResponse]:
        sweep_id = names.parse_resource_name(request.name, "sweepJobs")
        # Sweep events are few; none is coalesced, so the interval is unused.
        async for response in self._sweep_hub.watch(
            request.name, DEFAULT_PROGRESS_INTERVAL_S, partial(self._sweeps.get, sweep_id)
        ):
            yield response


# -- validation ----------------------------------------------------------------------


def _upload_violations(metadata: rpc.CreateDatasetMetadata) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    try:
        names.check_id(metadata.dataset_id, field="metadata.dataset_id")
    except InvalidArgumentError as error:
        violations += error.violations
    else:
        if datasets.is_builtin(f"datasets/{metadata.dataset_id}"):
            violations.append(
                FieldViolation("metadata.dataset_id", "reserved for a built-in dataset")
            )
    if not _SHA256.match(metadata.sha256):
        violations.append(
            FieldViolation("metadata.sha256", "required: 64 lowercase hex characters")
        )
    if metadata.size_bytes <= 0:
        violations.append(FieldViolation("metadata.size_bytes", "the file cannot be empty"))
    dataset = metadata.dataset
    if dataset.format not in (
        pb.DATASET_FORMAT_NPZ,
        pb.DATASET_FORMAT_CSV,
        pb.DATASET_FORMAT_PARQUET,
    ):
        violations.append(
            FieldViolation("metadata.dataset.format", "required: NPZ, CSV or PARQUET")
        )
    violations += _text("metadata.dataset.display_name", dataset.display_name, chars=128)
    violations += _text("metadata.dataset.description", dataset.description, size=16 * KIB)
    return violations


def _job_violations(job: pb.TrainingJob) -> list[FieldViolation]:
    return [
        *_text("training_job.display_name", job.display_name, chars=MAX_DISPLAY_NAME_CHARS),
        *_labels("training_job.labels", job.labels),
    ]


def _registration_violations(registration: pb.RegistrationSpec, field: str) -> list[FieldViolation]:
    return [
        *_text(f"{field}.description", registration.description, size=MAX_DESCRIPTION_BYTES),
        *_text(f"{field}.model_card", registration.model_card, size=MAX_MODEL_CARD_BYTES),
        *_labels(f"{field}.labels", registration.labels),
    ]


def _dataset_name_violations(data: pb.DatasetSpec, field: str) -> list[FieldViolation]:
    violations = []
    if not data.dataset:
        violations.append(FieldViolation(f"{field}.dataset", "required: datasets/{dataset}"))
    named = [(f"{field}.dataset", data.dataset)] if data.dataset else []
    named += [
        (f"{field}.additional_datasets[{i}]", extra)
        for i, extra in enumerate(data.additional_datasets)
    ]
    for path, value in named:
        try:
            names.parse_resource_name(value, "datasets", field=path)
        except InvalidArgumentError as error:
            violations += error.violations
    return violations


def _text(field: str, value: str, *, chars: int = 0, size: int = 0) -> list[FieldViolation]:
    if chars and len(value) > chars:
        return [FieldViolation(field, f"at most {chars} characters")]
    if size and len(value.encode()) > size:
        return [FieldViolation(field, f"at most {size} bytes")]
    return []


def _labels(field: str, labels: Any) -> list[FieldViolation]:
    violations = []
    if len(labels) > MAX_LABELS:
        violations.append(FieldViolation(field, f"at most {MAX_LABELS} entries"))
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            violations.append(
                FieldViolation(field, f"keys are lowercase letters, digits, _ and -: {key!r}")
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            violations.append(
                FieldViolation(f"{field}[{key}]", f"at most {MAX_LABEL_VALUE_CHARS} characters")
            )
    return violations


def _schema(dataset: pb.Dataset) -> DatasetSchema:
    return DatasetSchema(
        example_shape=tuple(int(d) for d in dataset.example_shape),
        num_classes=len(dataset.class_names),
        modality=dataset.modality,
        num_examples=int(dataset.example_count),
    )


def _mismatch(primary: pb.Dataset | None, schema: DatasetSchema, extra: pb.Dataset) -> str:
    """Why ``extra`` cannot be appended to the primary data (empty when it can)."""
    shape = tuple(int(d) for d in extra.example_shape)
    if extra.modality != schema.modality or shape != schema.example_shape:
        return f"example shape {list(shape)} differs from {list(schema.example_shape)}"
    if len(extra.class_names) != schema.num_classes:
        return f"{len(extra.class_names)} classes, not {schema.num_classes}"
    if primary is not None and list(extra.class_names) != list(primary.class_names):
        return "different class names"
    if primary is not None and list(extra.feature_names) != list(primary.feature_names):
        return "different feature names"
    return ""


def _exists(name: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"{name} already exists", reason="DATASET_EXISTS", metadata={"name": name}
    )


# -- filter fields ------------------------------------------------------------------


def _dataset_field(dataset: pb.Dataset, field: str) -> object:
    if field == "source":
        return pb.DatasetSource.Name(dataset.source).removeprefix("DATASET_SOURCE_")
    if field == "modality":
        return pb.DataModality.Name(dataset.modality).removeprefix("DATA_MODALITY_")
    return registry_pb.TaskType.Name(dataset.task).removeprefix("TASK_TYPE_")


def _sweep_field(sweep: pb.SweepJob, field: str) -> object:
    if field == "state":
        return state_name(sweep.state)
    if field.startswith("labels."):
        return sweep.labels.get(field.removeprefix("labels."))
    return sweep.created_by


def _job_field(job: pb.TrainingJob, field: str) -> object:
    if field == "state":
        return state_name(job.state)
    if field == "create_time":
        return job.create_time.ToDatetime(tzinfo=UTC)
    if field.startswith("labels."):
        return job.labels.get(field.removeprefix("labels."))
    values: dict[str, str] = {
        "spec.data.dataset": job.spec.data.dataset,
        "spec.architecture.name": job.spec.architecture.name,
        "spec.registration.model": job.spec.registration.model,
        "sweep_job": job.sweep_job,
        "created_by": job.created_by,
    }
    return values[field]
