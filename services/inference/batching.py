"""Dynamic batching: concurrent requests to one model merged into one computation.

Requests queue per model. The scheduler takes the oldest request and gathers
the ones after it that fit (the same datatypes and per-example shapes) until
the batch holds ``max_batch_size`` rows or ``max_queue_delay`` has passed
since the oldest arrived, runs the model once on the concatenated inputs, and
splits the outputs back by each request's rows, exactly.

- **Bounded.** At most ``max_queue_size`` requests wait; one more is refused
  at once with RESOURCE_EXHAUSTED (``QUEUE_FULL``) instead of growing a backlog.
- **Deadlines.** A request whose deadline passes while it waits is answered
  DEADLINE_EXCEEDED and never computed; a caller that goes away (its task
  cancelled) is dropped the same way.
- **Failures.** A computation that fails fails the requests in its batch
  only; the queue goes on.
- **Statistics** like Triton's: requests, batches (executions), rows, and the
  cumulative time requests waited and computations took.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from conveyor.shared.errors import (
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)

Arrays = Mapping[str, npt.NDArray[Any]]
Compute = Callable[[dict[str, npt.NDArray[Any]]], Awaitable[dict[str, npt.NDArray[Any]]]]


@dataclass
class BatchStatistics:
    """Cumulative counts and durations since the batcher started."""

    requests: int = 0
    """Requests computed (each in some batch)."""
    executions: int = 0
    """Computations run (batches)."""
    rows: int = 0
    """Examples computed, over all batches."""
    queue_ns: int = 0
    """Time requests waited before their batch ran, summed."""
    compute_ns: int = 0
    """Time computations took, summed per request (as Triton counts it)."""
    refused_full: int = 0
    expired: int = 0
    failed: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """How many batches had each number of rows."""
    batch_compute_ns: dict[int, int] = field(default_factory=dict)
    """How long the batches of each number of rows computed, summed."""


class BatchTiming(NamedTuple):
    """When one request queued, and when the batch that computed it ran
    (on the batcher's clock), and that batch's rows."""

    arrived: float
    started: float
    finished: float
    batch_rows: int


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, npt.NDArray[Any]]
    rows: int
    key: tuple[Any, ...]
    deadline: float | None
    arrived: float
    answer: asyncio.Future[tuple[dict[str, npt.NDArray[Any]], BatchTiming]]


class DynamicBatcher:
    """Merges concurrent requests to one model and runs ``compute`` on each batch."""

    def __init__(
        self,
        compute: Compute,
        *,
        max_batch_size: int,
        max_queue_delay: timedelta,
        max_queue_size: int,
        max_concurrent_batches: int = 1,
        on_batch: Callable[[int, list[float], float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_batch`` is told of each computed batch: its rows, how long each
        of its requests waited, and how long it computed (seconds)."""
        if min(max_batch_size, max_queue_size, max_concurrent_batches) < 1:
            raise ValueError(
                "max_batch_size, max_queue_size and max_concurrent_batches are at least 1"
            )
        self._compute = compute
        self._on_batch = on_batch
        self.max_batch_size = max_batch_size
        self._delay_s = max_queue_delay.total_seconds()
        self.max_queue_size = max_queue_size
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._runner: asyncio.Task[None] | None = None
        # One computation per model instance at a time; while they all run,
        # requests keep queueing and the next batch is fuller.
        self._max_running = max_concurrent_batches
        self._running = 0
        self._executions: set[asyncio.Task[None]] = set()
        self.statistics = BatchStatistics()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def infer(self, inputs: Arrays, *, deadline: float | None = None) -> dict[str, Any]:
        """``compute``'s outputs for ``inputs`` (each array's first dimension is
        the batch), computed in some batch; ``deadline`` is on the batcher's
        clock."""
        outputs, _ = await self.infer_timed(inputs, deadline=deadline)
        return outputs

    async def infer_timed(
        self, inputs: Arrays, *, deadline: float | None = None
    ) -> tuple[dict[str, Any], BatchTiming]:
        """As :meth:`infer`, with when the request waited and computed."""
        if self._closed:
            raise UnavailableError("the model is being unloaded", reason="MODEL_UNLOADING")
        rows = _rows(inputs)
        if rows > self.max_batch_size:
            raise InvalidArgumentError(
                f"a batch of {rows} is over the model's max batch size {self.max_batch_size}",
                violations=[
                    FieldViolation("inputs", f"at most {self.max_batch_size} in the batch")
                ],
                reason="BATCH_TOO_LARGE",
            )
        now = self._clock()
        if deadline is not None and deadline <= now:
            self.statistics.expired += 1
            raise _expired()
        if len(self._queue) >= self.max_queue_size:
            self.statistics.refused_full += 1
            raise ResourceExhaustedError(
                f"the model's queue is full ({len(self._queue)} requests); retry later",
                reason="QUEUE_FULL",
                metadata={"max_queue_size": str(self.max_queue_size)},
            )
        if (
            not self._queue
            and self._running < self._max_running
            and (self._delay_s <= 0 or rows >= self.max_batch_size)
        ):
            # Nothing waits and an instance is free: compute in this call. Going
            # through the queue and the scheduler task would only add event-loop
            # hops; requests that arrive meanwhile queue and leave as the next,
            # fuller batch.
            self._running += 1
            try:
                started = self._clock()
                try:
                    outputs = await self._compute(dict(inputs))
                except Exception:
                    self.statistics.failed += 1
                    raise
                finished = self._clock()
                self._count(rows, [started - now], started, finished)
                return outputs, BatchTiming(now, started, finished, rows)
            finally:
                self._running -= 1
                if self._queue:
                    self._ensure_running()
                    self._wake.set()
        pending = _Pending(
            inputs=dict(inputs),
            rows=rows,
            key=_key(inputs),
            deadline=deadline,
            arrived=now,
            answer=asyncio.get_running_loop().create_future(),
        )
        self._queue.append(pending)
        self._ensure_running()
        self._wake.set()
        try:
            return await pending.answer
        except asyncio.CancelledError:
            # The caller went away: its request is skipped if not yet computed.
            pending.answer.cancel()
            raise

    async def close(self) -> None:
        """Refuse new requests, fail the waiting ones with UNAVAILABLE, stop."""
        self._closed = True
        while self._queue:
            pending = self._queue.popleft()
            if not pending.answer.done():
                pending.answer.set_exception(
                    UnavailableError("the model was unloaded", reason="MODEL_UNLOADED")
                )
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        # Batches already computing finish: their callers get their answers.
        if self._executions:
            await asyncio.wait(set(self._executions))

    # -- scheduling -----------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="dynamic-batcher")

    async def _run(self) -> None:
        while not self._closed:
            if not self._queue or self._running >= self._max_running:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = await self._gather()
            if not batch:
                continue
            self._running += 1
            execution = asyncio.create_task(self._execute(batch))
            self._executions.add(execution)
            execution.add_done_callback(self._finished)

    def _finished(self, execution: asyncio.Task[None]) -> None:
        self._executions.discard(execution)
        self._running -= 1
        self._wake.set()

    async def _gather(self) -> list[_Pending]:
        """The next batch: the oldest live request and the compatible ones after
        it, once full or once the oldest has waited ``max_queue_delay``."""
        while True:
            self._drop_dead()
            if not self._queue:
                return []
            first = self._queue[0]
            batch = self._compatible(first)
            rows = sum(p.rows for p in batch)
            wait = first.arrived + self._delay_s - self._clock()
            if rows >= self.max_batch_size or wait <= 0:
                for pending in batch:
                    self._queue.remove(pending)
                return batch
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _compatible(self, first: _Pending) -> list[_Pending]:
        batch, rows = [], 0
        for pending in self._queue:
            if pending.key != first.key or pending.answer.done():
                continue
            if rows + pending.rows > self.max_batch_size:
                break
            batch.append(pending)
            rows += pending.rows
        return batch

    def _drop_dead(self) -> None:
        """Answer the expired requests and forget the abandoned ones."""
        now = self._clock()
        for pending in list(self._queue):
            if pending.answer.done():
                self._queue.remove(pending)
            elif pending.deadline is not None and pending.deadline <= now:
                self._queue.remove(pending)
                self.statistics.expired += 1
                pending.answer.set_exception(_expired())

    async def _execute(self, batch: list[_Pending]) -> None:
        started = self._clock()
        inputs = {
            name: np.concatenate([p.inputs[name] for p in batch]) if len(batch) > 1 else array
            for name, array in batch[0].inputs.items()
        }
        try:
            outputs = await self._compute(inputs)
        except Exception as error:  # noqa: BLE001 - whatever the model raised, its callers get
            self.statistics.failed += len(batch)
            for pending in batch:
                if not pending.answer.done():
                    pending.answer.set_exception(error)
            return
        finished = self._clock()
        rows = sum(p.rows for p in batch)
        self._count(rows, [started - p.arrived for p in batch], started, finished)
        offset = 0
        for pending in batch:
            part = {name: array[offset : offset + pending.rows] for name, array in outputs.items()}
            offset += pending.rows
            if not pending.answer.done():
                pending.answer.set_result(
                    (part, BatchTiming(pending.arrived, started, finished, rows))
                )

    def _count(self, rows: int, waits: list[float], started: float, finished: float) -> None:
        """The statistics and the observer of one computed batch (``waits``: one
        per request in it)."""
        stats = self.statistics
        compute_ns = int((finished - started) * 1e9)
        stats.executions += 1
        stats.requests += len(waits)
        stats.rows += rows
        stats.batch_sizes[rows] = stats.batch_sizes.get(rows, 0) + 1
        stats.batch_compute_ns[rows] = stats.batch_compute_ns.get(rows, 0) + compute_ns
        stats.queue_ns += int(sum(waits) * 1e9)
        stats.compute_ns += compute_ns * len(waits)
        if self._on_batch is not None:
            self._on_batch(rows, waits, finished - started)


def _rows(inputs: Arrays) -> int:
    sizes = {array.shape[0] if array.ndim else 1 for array in inputs.values()}
    if len(sizes) != 1:
        raise InvalidArgumentError(
            "the inputs' first (batch) dimensions differ",
            violations=[FieldViolation("inputs", "every input has the same batch size")],
        )
    return sizes.pop()


def _key(inputs: Arrays) -> tuple[Any, ...]:
    """What requests must share to be batched: names, datatypes, example shapes."""
    return tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items()))


def _expired() -> DeadlineExceededError:
    return DeadlineExceededError(
        "the request's deadline passed while it waited; it was not computed",
        reason="DEADLINE_PASSED_IN_QUEUE",
    )
