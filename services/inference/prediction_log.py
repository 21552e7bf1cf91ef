"""The prediction log: served predictions, sampled, sent to the monitor in the
background through a bounded buffer.

Serving must never wait on the monitor (its contract says as much: inference
drops and counts what it cannot send). So :meth:`PredictionLog.offer` is a
plain synchronous call that decides sampling, builds the records only for a
sampled prediction, and appends what fits in the buffer; everything that can
be slow or fail happens in one background task:

- **Batches.** Records leave in ``BatchLogPredictions`` calls of up to
  ``batch_size`` records, as soon as a batch is full or once
  ``flush_interval`` has passed without one filling.
- **Bounded.** At most ``capacity`` records wait. When the monitor is slow or
  down the buffer fills and further records are dropped and counted, instead
  of growing memory or slowing requests.
- **Failures.** A failed send (the monitor down, refusing, or past the
  timeout) drops its batch, counts it, and backs off exponentially before the
  next send, so a down monitor costs one fast-failing call per back-off
  period rather than one per batch. Batches are not retried: records are
  idempotent on the monitor's side, but retrying would only compete with
  fresher records for the same bounded buffer.
- **Closing.** :meth:`PredictionLog.close` sends what it can within a drain
  timeout and counts the rest as dropped.
- **Tracing.** A prediction offered while a recording span is current (its
  call's server span) keeps that span's context. A batch that holds such
  predictions is sent within a ``prediction_log.send`` span whose parent is the
  first of them, linked to the others (OpenTelemetry's way for a batch that
  serves several traces): the monitor's ingest of a prediction's record joins
  the prediction's trace, or the trace of the first prediction batched with it.
  Nothing of this is done for untraced predictions.

:func:`records_for` turns one served request (its arrays) into the
``PredictionRecord`` rows the monitor stores; :func:`monitor_sender` is the
``send`` callable for a real monitor channel.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import duration_pb2, timestamp_pb2
from opentelemetry import trace

from conveyor.monitor.v1 import monitor_messages_pb2, monitor_service_pb2_grpc
from conveyor.monitor.v1.resources_pb2 import FeatureValues, PredictionRecord

logger = logging.getLogger(__name__)

Send = Callable[[Sequence[PredictionRecord]], Awaitable[None]]
"""Delivers one batch of records to the monitor; raises when it was not delivered."""

Build = Callable[[], list[PredictionRecord]]
"""Builds the records of one prediction (called only when it is sampled)."""

MAX_REQUEST_ID_LENGTH: Final = 256
"""The monitor's limit on ``PredictionRecord.request_id``."""

MAX_BATCH_SIZE: Final = 10_000
"""The most records the monitor takes in one ``BatchLogPredictions`` call."""

SEND_SPAN: Final = "prediction_log.send"
"""The span of one batch sent to the monitor (see the module: Tracing)."""

MAX_LINKED_PREDICTIONS: Final = 64
"""The most predictions, besides its parent, a send span links to."""

tracer = trace.get_tracer(__name__)

_NUMERIC_KINDS: Final = frozenset("biuf")
_TEXT_KINDS: Final = frozenset("OSU")


class Outcome(enum.StrEnum):
    """What became of records; the dropped values name the reason."""

    SENT = "sent"
    """The monitor took them."""
    FULL = "full"
    """Dropped: the buffer was full."""
    FAILED = "failed"
    """Dropped: the send of their batch failed."""
    CLOSED = "closed"
    """Dropped: the log closed before they could be sent."""


Observe = Callable[[Sequence[PredictionRecord], Outcome], None]
"""Told what became of records (for per-model metrics); must not block."""


@dataclass
class PredictionLogStatistics:
    """Counts since the log was created. ``offered`` and ``sampled_out`` count
    predictions (calls to :meth:`PredictionLog.offer`); the rest count records."""

    offered: int = 0
    """Predictions offered."""
    sampled_out: int = 0
    """Predictions skipped by sampling; their records were never built."""
    build_errors: int = 0
    """Sampled predictions whose records could not be built (nothing logged)."""
    buffered: int = 0
    """Records waiting to be sent now."""
    sent: int = 0
    """Records the monitor took."""
    dropped_full: int = 0
    """Records dropped because the buffer was full."""
    dropped_failed: int = 0
    """Records dropped with a batch whose send failed."""
    dropped_closed: int = 0
    """Records dropped because the log closed (offered after, or not drained in time)."""
    failed_sends: int = 0
    """Sends that failed (each dropped its batch)."""


def records_for(
    model_version: str,
    request_id: str,
    inputs: Mapping[str, npt.NDArray[Any]],
    outputs: Mapping[str, npt.NDArray[Any]],
    *,
    latency: timedelta,
    time: datetime,
    shadow: bool = False,
    status_code: int = 0,
    subject_key: str = "",
) -> list[PredictionRecord]:
    """The records of one served request: one per row of its batch.

    Each array's first dimension is the batch. A row's numeric inputs (booleans
    as 0 and 1), flattened in ``inputs`` order, are its numerical features; its
    text inputs (``BYTES``: bytes decoded as UTF-8 with replacement, or str) its
    categorical ones. Its numeric outputs, flattened in ``outputs`` order, are
    the record's outputs; text outputs are left out, as the monitor's outputs
    are numbers. A failed request (``status_code`` not 0) gives one record
    without features or outputs, which is all the monitor reads of it.

    The request id is ``request_id`` for one row and ``{request_id}#{row}`` for
    several, so every record has its own idempotency key; an empty id gets a
    fresh random one, and an id too long for the monitor is replaced by its
    SHA-256 (the monitor would refuse the whole batch it travels in).
    """
    base_id = request_id or uuid.uuid4().hex
    common: dict[str, Any] = {
        "model_version": model_version,
        "time": _timestamp(time),
        "latency": _duration(latency),
        "status_code": status_code,
        "shadow": shadow,
        "subject_key": subject_key,
    }
    if status_code != 0:
        return [PredictionRecord(request_id=_fit_id(base_id), **common)]
    rows = _rows(inputs, outputs)
    if rows == 0:
        return []
    numerical = _numeric_matrix(inputs, rows)
    categorical = _text_matrix(inputs, rows)
    output_rows = _numeric_matrix(outputs, rows)
    records = []
    for row in range(rows):
        row_id = base_id if rows == 1 else f"{base_id}#{row}"
        features = FeatureValues(numerical=numerical[row], categorical=categorical[row])
        records.append(
            PredictionRecord(
                request_id=_fit_id(row_id), features=features, outputs=output_rows[row], **common
            )
        )
    return records


class PredictionLog:
    """Sends offered predictions to the monitor in the background; see the module.

    :meth:`offer` is called from the event loop's thread (the servicers'); it
    never blocks and never raises. ``sample_rate`` (0 to 1) is the default
    share of predictions logged; ``rng`` makes sampling reproducible in tests.
    ``observe``, when given, is told what became of each record (sent, or
    dropped and why), e.g. to count per model; its errors are logged and
    otherwise ignored.
    """

    def __init__(
        self,
        send: Send,
        *,
        capacity: int,
        batch_size: int,
        flush_interval: timedelta,
        sample_rate: float = 1.0,
        rng: random.Random | None = None,
        observe: Observe | None = None,
        min_backoff: timedelta = timedelta(milliseconds=100),
        max_backoff: timedelta = timedelta(seconds=5),
    ) -> None:
        if capacity < 1 or not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"capacity is at least 1 and batch_size 1 to {MAX_BATCH_SIZE}")
        if flush_interval <= timedelta(0):
            raise ValueError("flush_interval must be positive")
        _check_rate(sample_rate)
        if not timedelta(0) < min_backoff <= max_backoff:
            raise ValueError("backoff needs 0 < min_backoff <= max_backoff")
        self._send = send
        self.capacity = capacity
        self.batch_size = batch_size
        self._flush_s = flush_interval.total_seconds()
        self.sample_rate = sample_rate
        self._rng = rng or random.Random()
        self._observe = observe
        self._min_backoff_s = min_backoff.total_seconds()
        self._max_backoff_s = max_backoff.total_seconds()
        self._backoff_s = 0.0
        self._buffer: deque[PredictionRecord] = deque()
        # Traced predictions among the buffered records: (the position of their
        # first record, counted over every record ever buffered, their span's
        # context). Positions are compared with what left the buffer so far.
        self._origins: deque[tuple[int, trace.SpanContext]] = deque()
        self._buffered_total = 0
        self._taken_total = 0
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.statistics = PredictionLogStatistics()

    def offer(self, build: Build, *, sample_rate: float | None = None) -> None:
        """Logs one prediction if it is sampled (at ``sample_rate``, or the
        log's default): calls ``build`` and buffers what fits. Never blocks or
        raises; whatever is not logged is counted."""
        stats = self.statistics
        stats.offered += 1
        rate = self.sample_rate if sample_rate is None else sample_rate
        if rate < 1.0 and not self._rng.random() < rate:
            stats.sampled_out += 1
            return
        try:
            records = build()
        except Exception:
            stats.build_errors += 1
            logger.exception("prediction log: could not build the records of a prediction")
            return
        if self._closed:
            stats.dropped_closed += len(records)
            self._report(records, Outcome.CLOSED)
            return
        room = self.capacity - len(self._buffer)
        if room < len(records):
            stats.dropped_full += len(records) - room
            self._report(records[room:], Outcome.FULL)
            records = records[:room]
        if records:
            span = trace.get_current_span()
            if span.is_recording():
                self._origins.append((self._buffered_total, span.get_span_context()))
            self._buffered_total += len(records)
        self._buffer.extend(records)
        stats.buffered = len(self._buffer)
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    def start(self) -> None:
        """Starts sending in the background (in the running event loop)."""
        if self._task is not None:
            raise RuntimeError("the prediction log is already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="prediction-log")

    async def close(self, drain_timeout: timedelta) -> None:
        """Stops taking records, sends what is buffered for at most
        ``drain_timeout`` (without back-off), and drops the rest."""
        self._closed = True
        self._closing.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task}, timeout=max(drain_timeout.total_seconds(), 0.0))
            if not task.done():
                # The send in flight is cancelled; its batch counts as closed.
                task.cancel()
                await asyncio.wait({task})
        self._origins.clear()
        if self._buffer:
            rest = list(self._buffer)
            self._buffer.clear()
            self.statistics.buffered = 0
            self.statistics.dropped_closed += len(rest)
            self._report(rest, Outcome.CLOSED)

    # -- sending --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._closing.is_set():
                await self._wait_for_batch()
            if not self._buffer:
                if self._closing.is_set():
                    return
                continue
            batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
            self.statistics.buffered = len(self._buffer)
            await self._deliver(batch, self._take_origins(len(batch)))
            if self._backoff_s and not self._closing.is_set():
                await self._pause(self._backoff_s)

    async def _wait_for_batch(self) -> None:
        """Returns once a batch is full, ``flush_interval`` has passed, or the
        log is closing."""
        if len(self._buffer) >= self.batch_size:
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self._flush_s)
        except TimeoutError:
            return

    async def _pause(self, seconds: float) -> None:
        """Sleeps ``seconds`` unless the log starts closing first."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return

    def _take_origins(self, taken: int) -> list[trace.SpanContext]:
        """The span contexts of the traced predictions among the next ``taken``
        records, which have just left the buffer."""
        self._taken_total += taken
        origins = []
        while self._origins and self._origins[0][0] < self._taken_total:
            origins.append(self._origins.popleft()[1])
        return origins

    async def _deliver(
        self, batch: list[PredictionRecord], origins: Sequence[trace.SpanContext]
    ) -> None:
        stats = self.statistics
        try:
            with _send_span(len(batch), origins):
                await self._send(batch)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # close() gave up waiting for this send.
                stats.dropped_closed += len(batch)
                self._report(batch, Outcome.CLOSED)
                raise
            # grpc.aio answers a call cancelled under it (its channel closed)
            # with CancelledError: a failed send, not the end of the log.
            self._failed(batch, "the call was cancelled")
        except Exception as error:  # noqa: BLE001 - whatever the send raised, only its batch is lost
            self._failed(batch, _describe(error))
        else:
            stats.sent += len(batch)
            if self._backoff_s:
                logger.info(
                    "prediction log: the monitor takes records again after %d failed sends",
                    stats.failed_sends,
                )
            self._backoff_s = 0.0
            self._report(batch, Outcome.SENT)

    def _failed(self, batch: list[PredictionRecord], why: str) -> None:
        stats = self.statistics
        stats.failed_sends += 1
        stats.dropped_failed += len(batch)
        # One warning when the monitor becomes unreachable, not one per batch.
        log = logger.debug if self._backoff_s else logger.warning
        log(
            "prediction log: a batch of %d records could not be sent (%s); dropped, backing off",
            len(batch),
            why,
        )
        self._backoff_s = min(max(self._backoff_s * 2, self._min_backoff_s), self._max_backoff_s)
        self._report(batch, Outcome.FAILED)

    def _report(self, records: Sequence[PredictionRecord], outcome: Outcome) -> None:
        if self._observe is None or not records:
            return
        try:
            self._observe(records, outcome)
        except Exception:
            logger.exception("prediction log: the observer failed")


def counts_by_model(records: Sequence[PredictionRecord]) -> dict[str, int]:
    """How many of ``records`` each model (its id, from ``model_version``) has:
    what per-model counters need from an :data:`Observe` call."""
    counts: dict[str, int] = {}
    for record in records:
        parts = record.model_version.split("/")
        model = parts[1] if len(parts) == 4 and parts[0] == "models" else record.model_version
        counts[model] = counts.get(model, 0) + 1
    return counts


def monitor_sender(channel: grpc.aio.Channel, *, timeout: timedelta) -> Send:
    """A ``send`` for :class:`PredictionLog` that calls the monitor's
    ``BatchLogPredictions`` over ``channel``, each call bounded by ``timeout``."""
    stub = monitor_service_pb2_grpc.MonitorServiceStub(channel)
    seconds = timeout.total_seconds()

    async def send(records: Sequence[PredictionRecord]) -> None:
        request = monitor_messages_pb2.BatchLogPredictionsRequest(records=records)
        await stub.BatchLogPredictions(request, timeout=seconds)

    return send


# -- helpers --------------------------------------------------------------------------


def _send_span(
    records: int, origins: Sequence[trace.SpanContext]
) -> AbstractContextManager[object]:
    """The span a batch is sent in: a child of the first traced prediction's
    span, linked to the others; none when no prediction of the batch is traced."""
    if not origins:
        return nullcontext()
    first, *others = origins
    return tracer.start_as_current_span(
        SEND_SPAN,
        context=trace.set_span_in_context(trace.NonRecordingSpan(first)),
        links=[trace.Link(origin) for origin in others[:MAX_LINKED_PREDICTIONS]],
        attributes={
            "conveyor.prediction_log.records": records,
            "conveyor.prediction_log.predictions": len(origins),
        },
    )


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"a sample rate is between 0 and 1, not {rate}")


def _describe(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def _rows(*groups: Mapping[str, npt.NDArray[Any]]) -> int:
    """The batch size all arrays agree on (a 0-d array is one row)."""
    sizes = {name: _row_count(array) for group in groups for name, array in group.items()}
    distinct = set(sizes.values())
    if len(distinct) > 1:
        raise ValueError(f"arrays disagree on the batch size: {sizes}")
    return distinct.pop() if distinct else 1


def _row_count(array: npt.NDArray[Any]) -> int:
    return 1 if array.ndim == 0 else int(array.shape[0])


def _numeric_matrix(arrays: Mapping[str, npt.NDArray[Any]], rows: int) -> list[list[float]]:
    """Per row, the numeric arrays' values flattened in order, as floats."""
    parts = [
        np.asarray(array).reshape(rows, -1).astype(np.float64)
        for array in arrays.values()
        if array.dtype.kind in _NUMERIC_KINDS
    ]
    if not parts:
        return [[] for _ in range(rows)]
    matrix: list[list[float]] = np.concatenate(parts, axis=1).tolist()
    return matrix


def _text_matrix(arrays: Mapping[str, npt.NDArray[Any]], rows: int) -> list[list[str]]:
    """Per row, the text arrays' values flattened in order, as str."""
    matrix: list[list[str]] = [[] for _ in range(rows)]
    for array in arrays.values():
        if array.dtype.kind not in _TEXT_KINDS:
            continue
        for row, values in enumerate(np.asarray(array).reshape(rows, -1)):
            matrix[row].extend(_text(value) for value in values)
    return matrix


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _fit_id(request_id: str) -> str:
    if len(request_id) <= MAX_REQUEST_ID_LENGTH:
        return request_id
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _duration(value: timedelta) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration
