"""Watch streams of long-running jobs: any number of watchers per job.

A service publishes every event of a job to its :class:`WatchHub` as it
happens; each watcher gets its own queue. Events the service marks as
*coalesced* (step progress, or a whole-job update sent again at every change)
wait one at a time per watcher: only the latest is kept, and it is sent at
most once per the watcher's interval, so a slow or rate-limited watcher never
holds more than one. Every other event (state changes, epochs, checkpoints)
is delivered, in order; a watcher that falls more than
:data:`MAX_QUEUED_EVENTS` behind is ended with UNAVAILABLE (it may watch
again: the stream restarts from a snapshot). A draining server ends every
stream with UNAVAILABLE.

Used by the trainer (training jobs and sweeps) and the optimizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from google.protobuf.message import Message

from conveyor.shared.errors import UnavailableError

MAX_QUEUED_EVENTS = 10_000

Job = TypeVar("Job", bound=Message)
Event = TypeVar("Event", bound=Message)


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
        is_finished: Callable[[Job], bool],
        ends_stream: Callable[[Event], bool],
        coalesced: Callable[[Event], bool],
    ) -> None:
        self._snapshot_event = snapshot_event
        self._is_finished = is_finished
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
        """The job's snapshot event (from ``snapshot``, asked once this watcher
        is registered, so nothing after it is missed), then its events until
        the one that ends it."""
        if self._closed:
            raise _draining()
        watcher = _Watcher(interval_s, self._coalesced)
        watchers = self._watchers.setdefault(job_name, set())
        watchers.add(watcher)
        try:
            job = await snapshot()
            yield self._snapshot_event(job)
            if self._is_finished(job):
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


def _draining() -> UnavailableError:
    return UnavailableError(
        "the trainer is shutting down; watch again once it is back", reason="DRAINING"
    )
