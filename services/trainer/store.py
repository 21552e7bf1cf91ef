"""The trainer's store: uploaded datasets, training jobs and idempotency keys.

Synchronous SQLAlchemy Core over SQLite or PostgreSQL; the servicer and the job
manager call it from worker threads. Every write is one transaction, so a
refused or failed call changes nothing. Uploaded files live in a
content-addressed :class:`~conveyor.shared.storage.BlobStore`; a dataset row
only ever points at a blob that was fully written first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError

from conveyor.services.trainer import schema
from conveyor.shared.errors import (
    AlreadyExistsError,
    ConveyorError,
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
)
from conveyor.shared.filtering import Restriction, matches
from conveyor.shared.storage import BlobStore, read_transaction, write_transaction
from conveyor.trainer.v1 import resources_pb2 as pb

ORPHAN_GRACE_S = 600.0
"""Blobs younger than this are never collected (an upload may be committing)."""

QUEUED, RUNNING = pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING
TERMINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})
ACTIVE_STATES = frozenset({QUEUED, RUNNING})
M = TypeVar("M", pb.TrainingJob, pb.SweepJob)


def state_name(state: pb.JobState.ValueType) -> str:
    """``QUEUED`` for ``JOB_STATE_QUEUED``: the ``state`` column and filter value."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")


def now() -> datetime:
    return datetime.now(UTC)


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return stamp


def request_hash(message: Message) -> str:
    """The fingerprint of a request, for idempotency checks."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True)
class Page(Generic[M]):
    """One page of a listing and whether more follow."""

    items: list[M]
    has_more: bool


@dataclass(frozen=True)
class StoredUpload:
    """An uploaded dataset's file and the metadata it was uploaded with."""

    dataset: pb.Dataset
    upload: pb.Dataset
    sha256: str


class TrainerStore:
    """Trainer state on one database and one blob store (uploaded files)."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs

    # -- idempotency ---------------------------------------------------------

    def find_request(self, request_id: str, method: str, fingerprint: str) -> str | None:
        """The resource a completed request created, if ``request_id`` was seen."""
        if not request_id:
            return None
        with read_transaction(self.engine) as db:
            return find_request_in(db, request_id, method, fingerprint)

    # -- datasets ------------------------------------------------------------

    def create_dataset(
        self,
        dataset_id: str,
        dataset: pb.Dataset,
        upload: pb.Dataset,
        *,
        sha256: str,
        request_id: str,
        fingerprint: str,
    ) -> pb.Dataset:
        """Record an uploaded dataset whose file is already in the blob store."""
        name = f"datasets/{dataset_id}"
        exists = AlreadyExistsError(
            f"{name} already exists", reason="DATASET_EXISTS", metadata={"name": name}
        )
        created = now()
        body = pb.Dataset()
        body.CopyFrom(dataset)
        body.name = name
        body.create_time.CopyFrom(timestamp(created))
        with conflict_means(exists), write_transaction(self.engine) as db:
            done = find_request_in(db, request_id, "CreateDataset", fingerprint)
            if done is not None:
                return dataset_row(db, done.removeprefix("datasets/")).body_message
            if db.execute(
                select(schema.datasets.c.id).where(schema.datasets.c.dataset_id == dataset_id)
            ).first():
                raise exists
            db.execute(
                insert(schema.datasets).values(
                    dataset_id=dataset_id,
                    sha256=sha256,
                    size_bytes=body.size_bytes,
                    create_time=created,
                    body=body.SerializeToString(),
                    upload=upload.SerializeToString(),
                )
            )
            record_request(db, request_id, "CreateDataset", fingerprint, name, created)
        return body

    def dataset_exists(self, dataset_id: str) -> bool:
        with read_transaction(self.engine) as db:
            return (
                db.execute(
                    select(schema.datasets.c.id).where(schema.datasets.c.dataset_id == dataset_id)
                ).first()
                is not None
            )

    def get_dataset(self, dataset_id: str) -> pb.Dataset:
        with read_transaction(self.engine) as db:
            return dataset_row(db, dataset_id).body_message

    def get_upload(self, dataset_id: str) -> StoredUpload:
        with read_transaction(self.engine) as db:
            row = dataset_row(db, dataset_id)
        return StoredUpload(row.body_message, pb.Dataset.FromString(row.row.upload), row.row.sha256)

    def list_datasets(self) -> list[pb.Dataset]:
        """Every uploaded dataset, by name."""
        with read_transaction(self.engine) as db:
            rows = db.execute(
                select(schema.datasets.c.body).order_by(schema.datasets.c.dataset_id)
            ).all()
        return [pb.Dataset.FromString(row.body) for row in rows]

    def delete_dataset(self, dataset_id: str) -> None:
        """Remove an uploaded dataset and, when no other dataset shares it, its
        file. FAILED_PRECONDITION while a QUEUED or RUNNING job uses it."""
        name = f"datasets/{dataset_id}"
        with write_transaction(self.engine) as db:
            row = dataset_row(db, dataset_id).row
            specs = [(job.name, job.spec) for job in _jobs_in(db, ACTIVE_STATES)]
            specs += [(sweep.name, sweep.spec.base_spec) for sweep in active_sweeps_in(db)]
            users = [
                user
                for user, spec in specs
                if name == spec.data.dataset or name in spec.data.additional_datasets
            ]
            if users:
                raise FailedPreconditionError(
                    f"{name} is used by {len(users)} queued or running job(s) or sweep(s), "
                    f"such as {users[0]}; cancel them or wait for them to end",
                    reason="DATASET_IN_USE",
                    metadata={"name": name, "used_by": users[0]},
                )
            db.execute(delete(schema.datasets).where(schema.datasets.c.id == row.id))
            shared = db.execute(
                select(schema.datasets.c.id).where(schema.datasets.c.sha256 == row.sha256)
            ).first()
        if shared is None:
            self.blobs.delete(row.sha256)

    def collect_garbage(self) -> int:
        """Delete blobs no dataset refers to (left by an upload cut off between
        storing its file and recording it); returns how many."""
        with read_transaction(self.engine) as db:
            referenced = set(db.execute(select(schema.datasets.c.sha256)).scalars())
        removed = 0
        for digest in list(self.blobs.digests(older_than=ORPHAN_GRACE_S)):
            if digest not in referenced:
                self.blobs.delete(digest)
                removed += 1
        return removed

    # -- training jobs -------------------------------------------------------

    def create_job(
        self,
        job: pb.TrainingJob,
        *,
        uploaded: list[str],
        max_queued: int,
        request_id: str,
        fingerprint: str,
    ) -> pb.TrainingJob:
        """Insert ``job`` (named, QUEUED) unless its id is taken or the queue is
        full; ``uploaded`` are the ids of the uploaded datasets it uses, which
        must still exist (a concurrent DeleteDataset may have removed one)."""
        job_id = job.name.removeprefix("trainingJobs/")
        exists = AlreadyExistsError(
            f"{job.name} already exists", reason="TRAINING_JOB_EXISTS", metadata={"name": job.name}
        )
        with conflict_means(exists), write_transaction(self.engine) as db:
            done = find_request_in(db, request_id, "CreateTrainingJob", fingerprint)
            if done is not None:
                return _with_queue_position(db, _job_row(db, done.removeprefix("trainingJobs/")))
            if job_name_taken(db, job.name):
                raise exists
            for dataset_id in uploaded:
                dataset_row(db, dataset_id)
            insert_job(db, job, max_queued=max_queued)
            created = job.create_time.ToDatetime(tzinfo=UTC)
            record_request(db, request_id, "CreateTrainingJob", fingerprint, job.name, created)
            return _with_queue_position(db, _job_row(db, job_id))

    def get_job(self, job_id: str) -> pb.TrainingJob:
        with read_transaction(self.engine) as db:
            return _with_queue_position(db, _job_row(db, job_id))

    def list_jobs(
        self,
        restrictions: list[Restriction],
        resolve: Callable[[pb.TrainingJob, str], object],
        *,
        descending: bool,
        offset: int,
        limit: int,
    ) -> Page[pb.TrainingJob]:
        """A page of the stored jobs meeting ``restrictions``, by creation."""
        order = schema.training_jobs.c.id
        with read_transaction(self.engine) as db:
            rows = db.execute(
                select(schema.training_jobs.c.body).order_by(
                    order.desc() if descending else order.asc()
                )
            ).all()
            queue = _queue(db)
        found = []
        for row in rows:
            job = pb.TrainingJob.FromString(row.body)
            if job.state == QUEUED:
                job.queue_position = queue.get(job.name, 0)
            if matches(restrictions, partial(resolve, job)):
                found.append(job)
        return Page(found[offset : offset + limit], has_more=len(found) > offset + limit)

    def save_job(self, job: pb.TrainingJob) -> None:
        """Write ``job`` (an existing job) as it is now."""
        with write_transaction(self.engine) as db:
            _save(db, job)

    def update_job(
        self, job_id: str, change: Callable[[pb.TrainingJob], bool]
    ) -> tuple[pb.TrainingJob, bool]:
        """Apply ``change`` to the stored job in one transaction; it returns
        whether it changed anything (and may raise to refuse). Returns the job
        after the change and whether it was written."""
        with write_transaction(self.engine) as db:
            job = pb.TrainingJob.FromString(_job_row(db, job_id).body)
            changed = change(job)
            if changed:
                job.update_time.CopyFrom(timestamp(now()))
                _save(db, job)
            return _with_queue_position(db, _job_row(db, job_id)), changed

    def claim_next(self) -> pb.TrainingJob | None:
        """Move the oldest QUEUED job to RUNNING (its start time set) and return
        it; None when nothing waits."""
        with write_transaction(self.engine) as db:
            row = db.execute(
                select(schema.training_jobs.c.body)
                .where(schema.training_jobs.c.state == state_name(QUEUED))
                .order_by(schema.training_jobs.c.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            job = pb.TrainingJob.FromString(row.body)
            started = timestamp(now())
            job.state = RUNNING
            job.queue_position = 0
            if not job.HasField("start_time"):
                job.start_time.CopyFrom(started)
            job.update_time.CopyFrom(started)
            _save(db, job)
            return job

    def jobs_in_state(self, state: pb.JobState.ValueType) -> list[pb.TrainingJob]:
        """The jobs in ``state``, oldest first."""
        with read_transaction(self.engine) as db:
            return _jobs_in(db, {state})


# -- rows and conversions ----------------------------------------------------------


def job_name_taken(db: Connection, name: str) -> bool:
    job_id = name.removeprefix("trainingJobs/")
    return (
        db.execute(
            select(schema.training_jobs.c.id).where(schema.training_jobs.c.job_id == job_id)
        ).first()
        is not None
    )


def insert_job(db: Connection, job: pb.TrainingJob, *, max_queued: int) -> None:
    """Queue ``job`` (named, QUEUED, its name free) unless the queue is full."""
    waiting = db.execute(
        select(func.count())
        .select_from(schema.training_jobs)
        .where(schema.training_jobs.c.state == state_name(QUEUED))
    ).scalar_one()
    if waiting >= max_queued:
        raise ResourceExhaustedError(
            f"the job queue is full ({waiting} jobs waiting); retry later",
            reason="QUEUE_FULL",
            metadata={"queued_jobs": str(waiting), "max_queued_jobs": str(max_queued)},
        )
    job_id = job.name.removeprefix("trainingJobs/")
    db.execute(insert(schema.training_jobs).values(job_id=job_id, **_job_columns(job)))


@dataclass(frozen=True)
class _DatasetRow:
    row: Row[Any]

    @property
    def body_message(self) -> pb.Dataset:
        return pb.Dataset.FromString(self.row.body)


def dataset_row(db: Connection, dataset_id: str) -> _DatasetRow:
    row = db.execute(
        select(schema.datasets).where(schema.datasets.c.dataset_id == dataset_id)
    ).first()
    if row is None:
        name = f"datasets/{dataset_id}"
        raise NotFoundError(
            f"{name} does not exist", reason="DATASET_NOT_FOUND", metadata={"name": name}
        )
    return _DatasetRow(row)


def _job_row(db: Connection, job_id: str) -> Row[Any]:
    row = db.execute(
        select(schema.training_jobs).where(schema.training_jobs.c.job_id == job_id)
    ).first()
    if row is None:
        name = f"trainingJobs/{job_id}"
        raise NotFoundError(
            f"{name} does not exist", reason="TRAINING_JOB_NOT_FOUND", metadata={"name": name}
        )
    return row


def _jobs_in(db: Connection, states: set[Any] | frozenset[Any]) -> list[pb.TrainingJob]:
    rows = db.execute(
        select(schema.training_jobs.c.body)
        .where(schema.training_jobs.c.state.in_([state_name(s) for s in states]))
        .order_by(schema.training_jobs.c.id)
    ).all()
    return [pb.TrainingJob.FromString(row.body) for row in rows]


def active_sweeps_in(db: Connection) -> list[pb.SweepJob]:
    """The QUEUED and RUNNING sweeps, oldest first."""
    rows = db.execute(
        select(schema.sweep_jobs.c.body)
        .where(schema.sweep_jobs.c.state.in_([state_name(s) for s in ACTIVE_STATES]))
        .order_by(schema.sweep_jobs.c.id)
    ).all()
    return [pb.SweepJob.FromString(row.body) for row in rows]


def _queue(db: Connection) -> dict[str, int]:
    """Each QUEUED job's position (0 = next)."""
    rows = db.execute(
        select(schema.training_jobs.c.job_id)
        .where(schema.training_jobs.c.state == state_name(QUEUED))
        .order_by(schema.training_jobs.c.id)
    ).all()
    return {f"trainingJobs/{row.job_id}": position for position, row in enumerate(rows)}


def _with_queue_position(db: Connection, row: Row[Any]) -> pb.TrainingJob:
    job = pb.TrainingJob.FromString(row.body)
    job.queue_position = 0
    if job.state == QUEUED:
        job.queue_position = db.execute(
            select(func.count())
            .select_from(schema.training_jobs)
            .where(
                schema.training_jobs.c.state == state_name(QUEUED),
                schema.training_jobs.c.id < row.id,
            )
        ).scalar_one()
    return job


def _job_columns(job: pb.TrainingJob) -> dict[str, Any]:
    stored = pb.TrainingJob()
    stored.CopyFrom(job)
    stored.ClearField("queue_position")  # derived on every read
    return {
        "state": state_name(job.state),
        "dataset": job.spec.data.dataset,
        "architecture": job.spec.architecture.name[:32],
        "model": job.spec.registration.model,
        "sweep_job": job.sweep_job,
        "created_by": job.created_by[:300],
        "create_time": job.create_time.ToDatetime(tzinfo=UTC),
        "update_time": job.update_time.ToDatetime(tzinfo=UTC),
        "body": stored.SerializeToString(),
    }


def _save(db: Connection, job: pb.TrainingJob) -> None:
    job_id = job.name.removeprefix("trainingJobs/")
    columns = _job_columns(job)
    del columns["create_time"]
    result = db.execute(
        update(schema.training_jobs)
        .where(schema.training_jobs.c.job_id == job_id)
        .values(**columns)
    )
    if result.rowcount != 1:
        _job_row(db, job_id)  # NOT_FOUND


def find_request_in(db: Connection, request_id: str, method: str, fingerprint: str) -> str | None:
    if not request_id:
        return None
    row = db.execute(
        select(schema.request_ids).where(schema.request_ids.c.request_id == request_id)
    ).first()
    if row is None:
        return None
    if row.method != method or row.request_hash != fingerprint:
        raise AlreadyExistsError(
            f"request_id {request_id} was used for a different request",
            reason="REQUEST_ID_CONFLICT",
            metadata={"request_id": request_id},
        )
    resource: str = row.resource_name
    return resource


def record_request(
    db: Connection, request_id: str, method: str, fingerprint: str, name: str, created: datetime
) -> None:
    if request_id:
        db.execute(
            insert(schema.request_ids).values(
                request_id=request_id,
                method=method,
                request_hash=fingerprint,
                resource_name=name,
                create_time=created,
            )
        )


@contextmanager
def conflict_means(error: ConveyorError) -> Iterator[None]:
    """A unique-constraint violation (a concurrent twin won the race) is ``error``."""
    try:
        yield
    except IntegrityError as conflict:
        raise error from conflict
