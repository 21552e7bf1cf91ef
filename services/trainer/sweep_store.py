"""Sweep jobs in the trainer's database (the ``sweep_jobs`` table).

A sweep's trials are training jobs; :meth:`SweepStore.add_trial` queues the
trial's job and records it in the sweep in one transaction, so a trainer that
dies in between leaves neither a job its sweep does not know nor a trial
without its job.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC
from functools import partial
from typing import Any

from google.protobuf.struct_pb2 import Struct
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine, Row

from conveyor.services.trainer import schema
from conveyor.services.trainer.store import (
    QUEUED,
    RUNNING,
    TERMINAL_STATES,
    Page,
    active_sweeps_in,
    conflict_means,
    find_request_in,
    insert_job,
    job_name_taken,
    now,
    record_request,
    state_name,
    timestamp,
)
from conveyor.shared.errors import AlreadyExistsError, NotFoundError
from conveyor.shared.filtering import Restriction, matches
from conveyor.shared.storage import read_transaction, write_transaction
from conveyor.trainer.v1 import resources_pb2 as pb


class SweepStore:
    """Sweep jobs on the trainer's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_sweep(self, sweep: pb.SweepJob, *, request_id: str, fingerprint: str) -> pb.SweepJob:
        """Insert ``sweep`` (named, QUEUED) unless its id is taken."""
        sweep_id = sweep.name.removeprefix("sweepJobs/")
        exists = AlreadyExistsError(
            f"{sweep.name} already exists", reason="SWEEP_JOB_EXISTS", metadata={"name": sweep.name}
        )
        with conflict_means(exists), write_transaction(self.engine) as db:
            done = find_request_in(db, request_id, "CreateSweepJob", fingerprint)
            if done is not None:
                return _sweep(db, done.removeprefix("sweepJobs/"))
            if _sweep_row(db, sweep_id, missing_ok=True) is not None:
                raise exists
            db.execute(insert(schema.sweep_jobs).values(sweep_id=sweep_id, **_columns(sweep)))
            created = sweep.create_time.ToDatetime(tzinfo=UTC)
            record_request(db, request_id, "CreateSweepJob", fingerprint, sweep.name, created)
            return sweep

    def get_sweep(self, sweep_id: str) -> pb.SweepJob:
        with read_transaction(self.engine) as db:
            return _sweep(db, sweep_id)

    def list_sweeps(
        self,
        restrictions: list[Restriction],
        resolve: Callable[[pb.SweepJob, str], object],
        *,
        descending: bool,
        offset: int,
        limit: int,
    ) -> Page[pb.SweepJob]:
        """A page of the sweeps meeting ``restrictions``, by creation."""
        order = schema.sweep_jobs.c.id
        with read_transaction(self.engine) as db:
            rows = db.execute(
                select(schema.sweep_jobs.c.body).order_by(
                    order.desc() if descending else order.asc()
                )
            ).all()
        found = [pb.SweepJob.FromString(row.body) for row in rows]
        found = [sweep for sweep in found if matches(restrictions, partial(resolve, sweep))]
        return Page(found[offset : offset + limit], has_more=len(found) > offset + limit)

    def active_sweeps(self) -> list[pb.SweepJob]:
        """The QUEUED and RUNNING sweeps, oldest first."""
        with read_transaction(self.engine) as db:
            return active_sweeps_in(db)

    def update_sweep(
        self, sweep_id: str, change: Callable[[pb.SweepJob], bool]
    ) -> tuple[pb.SweepJob, pb.SweepJob]:
        """Apply ``change`` to the stored sweep in one transaction (it returns
        whether it changed anything, and may raise to refuse); the sweep
        before and after."""
        with write_transaction(self.engine) as db:
            before = _sweep(db, sweep_id)
            after = pb.SweepJob()
            after.CopyFrom(before)
            if change(after):
                after.update_time.CopyFrom(timestamp(now()))
                _save(db, after)
            return before, after

    def add_trial(
        self, sweep_id: str, job: pb.TrainingJob, parameters: Struct, *, max_queued: int
    ) -> tuple[pb.SweepJob, pb.SweepJob] | None:
        """Queue ``job`` as the sweep's next trial (RESOURCE_EXHAUSTED when the
        queue is full) and record it; the sweep moves to RUNNING with its
        first trial. Returns the sweep before and after; None, and nothing
        written, when the sweep has ended or is being cancelled. A job id
        already taken gets a random suffix (``job.name`` says the one used)."""
        with write_transaction(self.engine) as db:
            before = _sweep(db, sweep_id)
            if before.state in TERMINAL_STATES or before.cancel_requested:
                return None
            sweep = pb.SweepJob()
            sweep.CopyFrom(before)
            if job_name_taken(db, job.name):
                job_id = job.name.removeprefix("trainingJobs/")[:54]
                job.name = f"trainingJobs/{job_id}-{uuid.uuid4().hex[:8]}"
            insert_job(db, job, max_queued=max_queued)
            sweep.trials.append(
                pb.SweepTrial(training_job=job.name, parameters=parameters, state=QUEUED)
            )
            stamp = timestamp(now())
            if sweep.state == QUEUED:
                sweep.state = RUNNING
                sweep.start_time.CopyFrom(stamp)
            sweep.update_time.CopyFrom(stamp)
            _save(db, sweep)
            return before, sweep


def _sweep_row(db: Connection, sweep_id: str, *, missing_ok: bool = False) -> Row[Any] | None:
    row = db.execute(
        select(schema.sweep_jobs).where(schema.sweep_jobs.c.sweep_id == sweep_id)
    ).first()
    if row is None and not missing_ok:
        name = f"sweepJobs/{sweep_id}"
        raise NotFoundError(
            f"{name} does not exist", reason="SWEEP_JOB_NOT_FOUND", metadata={"name": name}
        )
    return row


def _sweep(db: Connection, sweep_id: str) -> pb.SweepJob:
    row = _sweep_row(db, sweep_id)
    assert row is not None  # _sweep_row raised NOT_FOUND otherwise
    return pb.SweepJob.FromString(row.body)


def _columns(sweep: pb.SweepJob) -> dict[str, Any]:
    return {
        "state": state_name(sweep.state),
        "created_by": sweep.created_by[:300],
        "create_time": sweep.create_time.ToDatetime(tzinfo=UTC),
        "update_time": sweep.update_time.ToDatetime(tzinfo=UTC),
        "body": sweep.SerializeToString(),
    }


def _save(db: Connection, sweep: pb.SweepJob) -> None:
    columns = _columns(sweep)
    del columns["create_time"]
    sweep_id = sweep.name.removeprefix("sweepJobs/")
    db.execute(
        update(schema.sweep_jobs).where(schema.sweep_jobs.c.sweep_id == sweep_id).values(**columns)
    )
