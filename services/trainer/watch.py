"""WatchTrainingJob and WatchSweepJob streams: any number of watchers per job.

The job and sweep managers publish every event of a job to its hub as it
happens; each watcher gets its own queue. Progress events are coalesced per watcher: only
the latest one waits, and it is sent at most once per the watcher's interval,
so a slow or rate-limited watcher never holds more than one. Every other event
(state changes, epochs, checkpoints) is delivered, in order; a watcher that
falls more than :data:`MAX_QUEUED_EVENTS` behind is ended with UNAVAILABLE
(it may watch again: the stream restarts from a snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, TypeVar

from conveyor.services.trainer.store import TERMINAL_STATES, timestamp
from conveyor.shared.errors import UnavailableError
from conveyor.trainer.v1 import resources_pb2 as pb
from conveyor.trainer.v1 import trainer_messages_pb2 as rpc

MAX_QUEUED_EVENTS = 10_000

PROGRESS = pb.TRAINING_JOB_EVENT_TYPE_PROGRESS
STATE_CHANGED = pb.TRAINING_JOB_EVENT_TYPE_STATE_CHANGED

Job = TypeVar("Job", bound=pb.TrainingJob | pb.SweepJob)
Event = TypeVar("Event", bound=rpc.WatchTrainingJobResponse | rpc.WatchSweepJobResponse)


def event(
    event_type: pb.TrainingJobEventType.ValueType,
    *,
    job: pb.TrainingJob | None = None,
    progress: pb.TrainingProgress | None = None,
    epoch: pb.EpochSummary | None = None,
    checkpoint: pb.CheckpointInfo | None = None,
) -> rpc.WatchTrainingJobResponse:
    """A watch event stamped now."""
    response = rpc.WatchTrainingJobResponse(type=event_type)
    if job is not None:
        response.training_job.CopyFrom(job)
    if progress is not None:
        response.progress.CopyFrom(progress)
    if epoch is not None:
        response.epoch.CopyFrom(epoch)
    if checkpoint is not None:
        response.checkpoint.CopyFrom(checkpoint)
    response.event_time.CopyFrom(timestamp(datetime.now(UTC)))
    return response


def sweep_event(
    event_type: pb.SweepJobEventType.ValueType,
    *,
    sweep: pb.SweepJob | None = None,
    trial: pb.SweepTrial | None = None,
) -> rpc.WatchSweepJobResponse:
    """A sweep watch event stamped now."""
    response = rpc.WatchSweepJobResponse(type=event_type)
    if sweep is not None:
        response.sweep_job.CopyFrom(sweep)
    if trial is not None:
        response.trial.CopyFrom(trial)
    response.event_time.CopyFrom(timestamp(datetime.now(UTC)))
    return response


def is_terminal(response: rpc.WatchTrainingJobResponse) -> bool:
    """Whether ``response`` moves its job to a terminal state (the stream's last)."""
    return response.type == STATE_CHANGED and response.training_job.state in TERMINAL_STATES


def _ends_sweep(response: rpc.WatchSweepJobResponse) -> bool:
    return (
        response.type == pb.SWEEP_JOB_EVENT_TYPE_STATE_CHANGED
        and response.sweep_job.state in TERMINAL_STATES
    )


def _is_progress(response: rpc.WatchTrainingJobResponse) -> bool:
    return response.type == PROGRESS


class _Watcher(Generic[Event]):
    def __init__(self, interval_s: float, coalesced: Callable[[Event], bool]) -> None:
        self.interval_s = interval_s
        self.coalesced = coalesced
        self.events: deque[Event] = deque()
        self.progress: Event | None = None
        self.last_progress = -float("inf")
        self.wake = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, response: Event) -> None:
        if self.coalesced(response):
            self.progress = response
        else:
            # Anything pending is older than this event, and it carries progress.
            self.progress = None
            if len(self.events) >= MAX_QUEUED_EVENTS:
                self.overflowed = True
            else:
                self.events.append(response)
        self.wake.set()


class WatchHub(Generic[Job, Event]):
    """Fans a job's events out to its watchers."""

    def __init__(
        self,
        *,
        snapshot_event: Callable[[Job], Event],
        ends_stream: Callable[[Event], bool],
        coalesced: Callable[[Event], bool],
    ) -> None:
        self._snapshot_event = snapshot_event
        self._ends_stream = ends_stream
        self._coalesced = coalesced
        self._watchers: dict[str, set[_Watcher[Event]]] = {}
        self._closed = False

    def publish(self, job_name: str, response: Event) -> None:
        """Hand ``response`` to every watcher of ``job_name`` (never blocks)."""
        for watcher in self._watchers.get(job_name, ()):
            watcher.offer(response)

    def watcher_count(self, job_name: str) -> int:
        return len(self._watchers.get(job_name, ()))

    def close(self) -> None:
        """End every stream (the server is draining)."""
        self._closed = True
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.closed = True
                watcher.wake.set()

    async def watch(
        self,
        job_name: str,
        interval_s: float,
        snapshot: Callable[[], Awaitable[Job]],
    ) -> AsyncIterator[Event]:
        """The job's SNAPSHOT (from ``snapshot``, asked once this watcher is
        registered, so nothing after it is missed), then its events until the
        one that ends it."""
        if self._closed:
            raise _draining()
        watcher = _Watcher(interval_s, self._coalesced)
        watchers = self._watchers.setdefault(job_name, set())
        watchers.add(watcher)
        try:
            job = await snapshot()
            yield self._snapshot_event(job)
            if job.state in TERMINAL_STATES:
                return
            async for response in self._follow(watcher):
                yield response
                if self._ends_stream(response):
                    return
        finally:
            watchers.discard(watcher)
            if not watchers:
                self._watchers.pop(job_name, None)

    async def _follow(self, watcher: _Watcher[Event]) -> AsyncIterator[Event]:
        while True:
            if watcher.events:
                yield watcher.events.popleft()
                continue
            if watcher.overflowed:
                raise UnavailableError(
                    "this watcher fell too far behind; watch again for a fresh snapshot",
                    reason="WATCHER_TOO_SLOW",
                )
            if watcher.closed:
                raise _draining()
            wait_s: float | None = None
            if watcher.progress is not None:
                wait_s = watcher.last_progress + watcher.interval_s - time.monotonic()
                if wait_s <= 0:
                    pending, watcher.progress = watcher.progress, None
                    watcher.last_progress = time.monotonic()
                    yield pending
                    continue
            watcher.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watcher.wake.wait(), wait_s)


class TrainingWatchHub(WatchHub[pb.TrainingJob, rpc.WatchTrainingJobResponse]):
    """Training job streams: progress coalesced per watcher."""

    def __init__(self) -> None:
        super().__init__(
            snapshot_event=lambda job: event(pb.TRAINING_JOB_EVENT_TYPE_SNAPSHOT, job=job),
            ends_stream=is_terminal,
            coalesced=_is_progress,
        )


class SweepWatchHub(WatchHub[pb.SweepJob, rpc.WatchSweepJobResponse]):
    """Sweep streams: every event delivered."""

    def __init__(self) -> None:
        super().__init__(
            snapshot_event=lambda sweep: sweep_event(pb.SWEEP_JOB_EVENT_TYPE_SNAPSHOT, sweep=sweep),
            ends_stream=_ends_sweep,
            coalesced=lambda response: False,
        )


def _draining() -> UnavailableError:
    return UnavailableError(
        "the trainer is shutting down; watch again once it is back", reason="DRAINING"
    )
