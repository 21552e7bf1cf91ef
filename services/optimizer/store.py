"""The optimizer's store: optimisation jobs and idempotency keys.

Synchronous SQLAlchemy Core over SQLite or PostgreSQL, called from worker
threads. Every write is one transaction, so a refused call changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError

from conveyor.optimizer.v1 import resources_pb2 as pb
from conveyor.services.optimizer import schema
from conveyor.shared.errors import (
    AlreadyExistsError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from conveyor.shared.filtering import Restriction, matches
from conveyor.shared.storage import read_transaction, write_transaction

QUEUED: Final = pb.OPTIMIZATION_JOB_STATE_QUEUED
RUNNING: Final = pb.OPTIMIZATION_JOB_STATE_RUNNING
CANCELLING: Final = pb.OPTIMIZATION_JOB_STATE_CANCELLING
TERMINAL_STATES: Final = frozenset(
    {
        pb.OPTIMIZATION_JOB_STATE_SUCCEEDED,
        pb.OPTIMIZATION_JOB_STATE_FAILED,
        pb.OPTIMIZATION_JOB_STATE_CANCELLED,
    }
)


def state_name(state: pb.OptimizationJobState.ValueType) -> str:
    """``RUNNING`` for ``OPTIMIZATION_JOB_STATE_RUNNING``: the column and filter value."""
    return pb.OptimizationJobState.Name(state).removeprefix("OPTIMIZATION_JOB_STATE_")


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


@dataclass(frozen=True)
class Page:
    """One page of a listing and whether more follow."""

    items: list[pb.OptimizationJob]
    has_more: bool


class OptimizerStore:
    """Optimisation jobs on one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def find_request(self, request_id: str, fingerprint: str) -> pb.OptimizationJob | None:
        """The job a completed create with ``request_id`` made, if any."""
        if not request_id:
            return None
        with read_transaction(self.engine) as db:
            name = _find_request(db, request_id, fingerprint)
            return None if name is None else _job(db, _id(name))

    def create_job(
        self, job: pb.OptimizationJob, *, max_queued: int, request_id: str, fingerprint: str
    ) -> pb.OptimizationJob:
        """Insert ``job`` (named, QUEUED) unless its id is taken or the queue is full."""
        exists = AlreadyExistsError(
            f"{job.name} already exists",
            reason="OPTIMIZATION_JOB_EXISTS",
            metadata={"name": job.name},
        )
        with _conflict_means(exists), write_transaction(self.engine) as db:
            done = _find_request(db, request_id, fingerprint)
            if done is not None:
                return _job(db, _id(done))
            if _row(db, _id(job.name), missing_ok=True) is not None:
                raise exists
            waiting = db.execute(
                select(func.count())
                .select_from(schema.optimization_jobs)
                .where(schema.optimization_jobs.c.state == state_name(QUEUED))
            ).scalar_one()
            if waiting >= max_queued:
                raise ResourceExhaustedError(
                    f"the job queue is full ({waiting} jobs waiting); retry later",
                    reason="QUEUE_FULL",
                    metadata={"queued_jobs": str(waiting), "max_queued_jobs": str(max_queued)},
                )
            db.execute(
                insert(schema.optimization_jobs).values(job_id=_id(job.name), **_columns(job))
            )
            if request_id:
                db.execute(
                    insert(schema.request_ids).values(
                        request_id=request_id,
                        request_hash=fingerprint,
                        job_name=job.name,
                        create_time=job.create_time.ToDatetime(tzinfo=UTC),
                    )
                )
            return job

    def get_job(self, job_id: str) -> pb.OptimizationJob:
        with read_transaction(self.engine) as db:
            return _job(db, job_id)

    def list_jobs(
        self,
        restrictions: list[Restriction],
        resolve: Callable[[pb.OptimizationJob, str], object],
        *,
        descending: bool,
        offset: int,
        limit: int,
    ) -> Page:
        order = schema.optimization_jobs.c.id
        with read_transaction(self.engine) as db:
            rows = db.execute(
                select(schema.optimization_jobs.c.body).order_by(
                    order.desc() if descending else order.asc()
                )
            ).all()
        found = [pb.OptimizationJob.FromString(row.body) for row in rows]
        found = [job for job in found if matches(restrictions, partial(resolve, job))]
        return Page(found[offset : offset + limit], has_more=len(found) > offset + limit)

    def save_job(self, job: pb.OptimizationJob) -> None:
        with write_transaction(self.engine) as db:
            _save(db, job)

    def update_job(
        self, job_id: str, change: Callable[[pb.OptimizationJob], bool]
    ) -> tuple[pb.OptimizationJob, bool]:
        """Apply ``change`` to the stored job in one transaction (it returns
        whether it changed anything, and may raise to refuse)."""
        with write_transaction(self.engine) as db:
            job = _job(db, job_id)
            changed = change(job)
            if changed:
                _save(db, job)
            return job, changed

    def claim_next(self) -> pb.OptimizationJob | None:
        """Move the oldest QUEUED job to RUNNING and return it; None when none waits."""
        with write_transaction(self.engine) as db:
            row = db.execute(
                select(schema.optimization_jobs.c.body)
                .where(schema.optimization_jobs.c.state == state_name(QUEUED))
                .order_by(schema.optimization_jobs.c.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            job = pb.OptimizationJob.FromString(row.body)
            job.state = RUNNING
            job.start_time.CopyFrom(now())
            _save(db, job)
            return job

    def jobs_in_states(
        self, *states: pb.OptimizationJobState.ValueType
    ) -> list[pb.OptimizationJob]:
        with read_transaction(self.engine) as db:
            rows = db.execute(
                select(schema.optimization_jobs.c.body)
                .where(schema.optimization_jobs.c.state.in_([state_name(s) for s in states]))
                .order_by(schema.optimization_jobs.c.id)
            ).all()
        return [pb.OptimizationJob.FromString(row.body) for row in rows]


def _id(name: str) -> str:
    return name.removeprefix("optimizationJobs/")


def _row(db: Connection, job_id: str, *, missing_ok: bool = False) -> Row[Any] | None:
    row = db.execute(
        select(schema.optimization_jobs).where(schema.optimization_jobs.c.job_id == job_id)
    ).first()
    if row is None and not missing_ok:
        name = f"optimizationJobs/{job_id}"
        raise NotFoundError(
            f"{name} does not exist", reason="OPTIMIZATION_JOB_NOT_FOUND", metadata={"name": name}
        )
    return row


def _job(db: Connection, job_id: str) -> pb.OptimizationJob:
    row = _row(db, job_id)
    assert row is not None  # _row raised NOT_FOUND otherwise
    return pb.OptimizationJob.FromString(row.body)


def _columns(job: pb.OptimizationJob) -> dict[str, Any]:
    return {
        "state": state_name(job.state),
        "source": job.resolved_source_model_version[:200],
        "create_time": job.create_time.ToDatetime(tzinfo=UTC),
        "update_time": datetime.now(UTC),
        "body": job.SerializeToString(),
    }


def _save(db: Connection, job: pb.OptimizationJob) -> None:
    columns = _columns(job)
    del columns["create_time"]
    result = db.execute(
        update(schema.optimization_jobs)
        .where(schema.optimization_jobs.c.job_id == _id(job.name))
        .values(**columns)
    )
    if result.rowcount != 1:
        _row(db, _id(job.name))  # NOT_FOUND


def _find_request(db: Connection, request_id: str, fingerprint: str) -> str | None:
    if not request_id:
        return None
    row = db.execute(
        select(schema.request_ids).where(schema.request_ids.c.request_id == request_id)
    ).first()
    if row is None:
        return None
    if row.request_hash != fingerprint:
        raise InvalidArgumentError(
            f"request_id {request_id} was used for a different request",
            violations=[FieldViolation("request_id", "already used for a different request")],
            reason="REQUEST_ID_CONFLICT",
        )
    name: str = row.job_name
    return name


@contextmanager
def _conflict_means(error: AlreadyExistsError) -> Iterator[None]:
    """A unique-constraint violation (a concurrent twin won the race) is ``error``."""
    try:
        yield
    except IntegrityError as conflict:
        raise error from conflict
