"""The prediction log: records built per row of a served batch; sampling that
costs nothing for unsampled predictions; batches delivered in order to a real
gRPC monitor; a slow monitor never slowing callers (overflow dropped and
counted, the buffer bounded); a down monitor costing callers nothing; close
draining what it can and counting the rest."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor.monitor.v1 import monitor_messages_pb2, monitor_service_pb2_grpc
from conveyor.monitor.v1.resources_pb2 import PredictionRecord
from conveyor.services.inference.prediction_log import (
    SEND_SPAN,
    Outcome,
    PredictionLog,
    counts_by_model,
    monitor_sender,
    records_for,
)
from conveyor.shared.channel import create_channel

VERSION = "models/churn/versions/3"
NOW = datetime(2030, 5, 17, 12, 30, 15, 250000, tzinfo=UTC)
LATENCY = timedelta(milliseconds=7, microseconds=125)
NEVER = timedelta(hours=1)
"""A flush interval no test waits out: batches leave once full (or on close)."""
DRAIN = timedelta(seconds=30)


def one(index: int) -> list[PredictionRecord]:
    """The records of a one-row prediction whose features are ``[index]``."""
    return records_for(
        VERSION,
        f"req-{index}",
        {"x": np.array([[index]], dtype=np.float32)},
        {"y": np.array([[index * 2]], dtype=np.float32)},
        latency=LATENCY,
        time=NOW,
    )


# -- records_for --------------------------------------------------------------------


def test_one_row_becomes_one_record_with_every_field() -> None:
    inputs = {
        "amount": np.array([[12.5, -3.0]], dtype=np.float32),
        "city": np.array([[b"Paris"]], dtype=np.object_),
        "is_new": np.array([True]),
        "visits": np.array([[7]], dtype=np.int64),
    }
    outputs = {"probabilities": np.array([[0.25, 0.75]], dtype=np.float32)}
    [record] = records_for(
        VERSION, "req-1", inputs, outputs, latency=LATENCY, time=NOW, subject_key="cust-9"
    )
    assert record.model_version == VERSION
    assert record.request_id == "req-1"
    assert list(record.features.numerical) == [12.5, -3.0, 1.0, 7.0]
    assert list(record.features.categorical) == ["Paris"]
    assert list(record.outputs) == [0.25, 0.75]
    assert record.latency.ToTimedelta() == LATENCY
    assert record.time.ToDatetime(tzinfo=UTC) == NOW
    assert (record.status_code, record.shadow, record.subject_key) == (0, False, "cust-9")


def test_each_row_of_a_batch_is_a_record_with_its_own_id() -> None:
    inputs = {
        "x": np.arange(6, dtype=np.float64).reshape(3, 2),
        "flag": np.array([True, False, True]),
        "tags": np.array([[b"a", b"\xff"], [b"b", b"c"], [b"", b"d"]], dtype=np.object_),
        "kind": np.array(["red", "green", "blue"]),
    }
    outputs = {"y": np.array([[1.5], [2.5], [3.5]]), "label": np.array([b"k", b"l", b"m"])}
    records = records_for(VERSION, "batch", inputs, outputs, latency=LATENCY, time=NOW, shadow=True)
    assert [r.request_id for r in records] == ["batch#0", "batch#1", "batch#2"]
    assert [list(r.features.numerical) for r in records] == [
        [0.0, 1.0, 1.0],
        [2.0, 3.0, 0.0],
        [4.0, 5.0, 1.0],
    ]
    assert [list(r.features.categorical) for r in records] == [
        ["a", "\ufffd", "red"],
        ["b", "c", "green"],
        ["", "d", "blue"],
    ]
    # Text outputs are left out: the monitor's outputs are numbers.
    assert [list(r.outputs) for r in records] == [[1.5], [2.5], [3.5]]
    assert all(r.shadow for r in records)


def test_an_empty_request_id_gets_a_fresh_one() -> None:
    first = records_for(VERSION, "", {"x": np.zeros((2, 1))}, {}, latency=LATENCY, time=NOW)
    second = records_for(VERSION, "", {"x": np.zeros((1, 1))}, {}, latency=LATENCY, time=NOW)
    base = first[0].request_id.removesuffix("#0")
    assert len(base) == 32
    assert int(base, 16) >= 0
    assert [r.request_id for r in first] == [f"{base}#0", f"{base}#1"]
    assert second[0].request_id not in (base, "")


def test_an_id_too_long_for_the_monitor_is_replaced_by_its_hash() -> None:
    records = records_for(
        VERSION, "r" * 300, {"x": np.zeros((1, 1))}, {}, latency=LATENCY, time=NOW
    )
    assert len(records[0].request_id) == 64


def test_a_failed_request_is_one_record_without_features_or_outputs() -> None:
    inputs = {"x": np.zeros((4, 3), dtype=np.float32)}
    [record] = records_for(
        VERSION,
        "bad",
        inputs,
        {},
        latency=LATENCY,
        time=NOW,
        status_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
    )
    assert record.request_id == "bad"
    assert record.status_code == 3
    assert not record.HasField("features")
    assert list(record.outputs) == []


def test_arrays_that_disagree_on_the_batch_size_are_refused() -> None:
    with pytest.raises(ValueError, match="batch size"):
        records_for(
            VERSION,
            "r",
            {"x": np.zeros((2, 1))},
            {"y": np.zeros((3, 1))},
            latency=LATENCY,
            time=NOW,
        )


def test_records_are_counted_per_model_for_metrics() -> None:
    other = records_for(
        "models/fraud/versions/12", "f", {"x": np.zeros((2, 1))}, {}, latency=LATENCY, time=NOW
    )
    assert counts_by_model([*one(1), *other, *one(2)]) == {"churn": 2, "fraud": 2}


# -- sampling and buffering ---------------------------------------------------------


def test_sampling_builds_only_the_sampled_predictions() -> None:
    built = 0

    def build() -> list[PredictionRecord]:
        nonlocal built
        built += 1
        return one(built)

    log = PredictionLog(
        _never_called,
        capacity=10_000,
        batch_size=100,
        flush_interval=NEVER,
        sample_rate=0.25,
        rng=random.Random(20300517),
    )
    for _ in range(4000):
        log.offer(build)
    stats = log.statistics
    sampled = stats.offered - stats.sampled_out
    # Binomial(4000, 0.25): mean 1000, standard deviation about 27.
    assert 1000 - 140 < sampled < 1000 + 140
    assert built == sampled == stats.buffered
    # A per-offer rate overrides the default both ways.
    log.offer(build, sample_rate=1.0)
    log.offer(build, sample_rate=0.0)
    assert built == sampled + 1
    assert stats.offered == 4002


def test_offer_never_raises_and_keeps_the_buffer_bounded() -> None:
    outcomes: list[tuple[int, Outcome]] = []
    log = PredictionLog(
        _never_called,
        capacity=5,
        batch_size=100,
        flush_interval=NEVER,
        observe=lambda records, outcome: outcomes.append((len(records), outcome)),
    )

    def broken() -> list[PredictionRecord]:
        raise RuntimeError("the arrays were odd")

    log.offer(broken)
    log.offer(lambda: one(1) * 3)
    log.offer(lambda: one(2) * 3)  # two fit, one is dropped
    log.offer(lambda: one(3))
    stats = log.statistics
    assert (stats.offered, stats.build_errors) == (4, 1)
    assert (stats.buffered, stats.dropped_full) == (5, 2)
    assert outcomes == [(1, Outcome.FULL), (1, Outcome.FULL)]


# -- a real monitor -----------------------------------------------------------------


@dataclass
class RecordingMonitor(monitor_service_pb2_grpc.MonitorServiceServicer):
    """The monitor's ``BatchLogPredictions``, recording each batch; ``gate``
    holds every call until it is set (a slow monitor). ``called`` and
    ``stored`` are set on each call's arrival and each batch's storing."""

    batches: list[list[PredictionRecord]] = field(default_factory=list)
    traceparents: list[str] = field(default_factory=list)
    """Each call's W3C ``traceparent`` ("" without)."""
    calls: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    called: asyncio.Event = field(default_factory=asyncio.Event)
    stored: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    async def BatchLogPredictions(
        self, request: monitor_messages_pb2.BatchLogPredictionsRequest, context: Any
    ) -> monitor_messages_pb2.BatchLogPredictionsResponse:
        self.calls += 1
        self.traceparents.append(dict(context.invocation_metadata() or ()).get("traceparent", ""))
        self.called.set()
        await self.gate.wait()
        self.batches.append(list(request.records))
        self.stored.set()
        return monitor_messages_pb2.BatchLogPredictionsResponse(accepted_count=len(request.records))

    @property
    def received(self) -> list[PredictionRecord]:
        return [record for batch in self.batches for record in batch]


@pytest.fixture
async def monitor() -> AsyncIterator[tuple[RecordingMonitor, grpc.aio.Channel]]:
    servicer = RecordingMonitor()
    server = grpc.aio.server()
    monitor_service_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield servicer, channel
    await server.stop(None)


@pytest.fixture
async def traced_monitor() -> AsyncIterator[tuple[RecordingMonitor, grpc.aio.Channel]]:
    """Like ``monitor``, over a channel that traces its calls (as inference's does)."""
    servicer = RecordingMonitor()
    server = grpc.aio.server()
    monitor_service_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with create_channel(f"127.0.0.1:{port}", default_timeout=None) as channel:
        yield servicer, channel
    await server.stop(None)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but never listening: connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_the_monitor_receives_every_record_in_order(
    monitor: tuple[RecordingMonitor, grpc.aio.Channel],
) -> None:
    servicer, channel = monitor
    sent: list[PredictionRecord] = []
    log = PredictionLog(
        monitor_sender(channel, timeout=DRAIN),
        capacity=1000,
        batch_size=8,
        flush_interval=NEVER,
        observe=lambda records, outcome: sent.extend(records) if outcome is Outcome.SENT else None,
    )
    log.start()
    expected: list[PredictionRecord] = []
    for index in range(10):
        inputs = {"x": np.full((3, 2), index, dtype=np.float32)}
        outputs = {"y": np.full((3, 1), -index, dtype=np.float32)}
        records = records_for(VERSION, f"req-{index}", inputs, outputs, latency=LATENCY, time=NOW)
        expected.extend(records)
        log.offer(partial(list, records))
    await log.close(DRAIN)
    assert servicer.received == expected
    assert [len(batch) for batch in servicer.batches] == [8, 8, 8, 6]
    assert sent == expected
    stats = log.statistics
    assert (stats.sent, stats.buffered, stats.failed_sends) == (30, 0, 0)
    assert stats.dropped_full + stats.dropped_failed + stats.dropped_closed == 0


async def test_a_partial_batch_leaves_once_the_flush_interval_passes(
    monitor: tuple[RecordingMonitor, grpc.aio.Channel],
) -> None:
    servicer, channel = monitor
    log = PredictionLog(
        monitor_sender(channel, timeout=DRAIN),
        capacity=100,
        batch_size=50,
        flush_interval=timedelta(milliseconds=20),
    )
    log.start()
    log.offer(lambda: one(1))
    await servicer.stored.wait()
    assert [r.request_id for r in servicer.received] == ["req-1"]
    await log.close(DRAIN)


async def test_a_slow_monitor_never_holds_callers_and_overflow_is_counted(
    monitor: tuple[RecordingMonitor, grpc.aio.Channel],
) -> None:
    servicer, channel = monitor
    servicer.gate.clear()
    log = PredictionLog(
        monitor_sender(channel, timeout=DRAIN),
        capacity=10,
        batch_size=4,
        flush_interval=NEVER,
    )
    log.start()
    for index in range(4):
        log.offer(partial(one, index))
    await servicer.called.wait()  # the first batch is held by the monitor
    for index in range(4, 104):
        log.offer(partial(one, index))
        assert log.statistics.buffered <= log.capacity
    stats = log.statistics
    assert (stats.buffered, stats.dropped_full, stats.sent) == (10, 90, 0)

    # The event loop goes on serving while the send waits.
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        for _ in range(100):
            ticks += 1
            await asyncio.sleep(0)

    await tick()
    assert ticks == 100

    servicer.gate.set()
    await log.close(DRAIN)
    assert [r.request_id for r in servicer.received] == [f"req-{i}" for i in range(14)]
    assert (stats.sent, stats.dropped_full, stats.failed_sends) == (14, 90, 0)


async def test_a_down_monitor_costs_callers_nothing(closed_port: int) -> None:
    dropped: list[tuple[int, Outcome]] = []
    failed_twice = asyncio.Event()

    def observe(records: Sequence[PredictionRecord], outcome: Outcome) -> None:
        dropped.append((len(records), outcome))
        if sum(outcome is Outcome.FAILED for _, outcome in dropped) >= 2:
            failed_twice.set()

    async with grpc.aio.insecure_channel(f"127.0.0.1:{closed_port}") as channel:
        log = PredictionLog(
            monitor_sender(channel, timeout=timedelta(seconds=5)),
            capacity=100,
            batch_size=2,
            flush_interval=timedelta(milliseconds=10),
            min_backoff=timedelta(milliseconds=10),
            max_backoff=timedelta(milliseconds=40),
            observe=observe,
        )
        log.start()
        for index in range(10):
            log.offer(partial(one, index))
        await failed_twice.wait()
        await log.close(DRAIN)
        log.offer(lambda: one(99))  # after close: counted, never raised
    stats = log.statistics
    assert stats.sent == 0
    assert stats.dropped_failed == 2 * stats.failed_sends
    assert stats.dropped_failed + stats.dropped_closed == 11
    assert stats.buffered == 0
    assert sum(n for n, outcome in dropped if outcome is Outcome.FAILED) == stats.dropped_failed
    assert {outcome for _, outcome in dropped} <= {Outcome.FAILED, Outcome.CLOSED}


# -- tracing ---------------------------------------------------------------------------


async def test_a_batch_is_sent_in_the_trace_of_its_first_traced_prediction(
    traced_monitor: tuple[RecordingMonitor, grpc.aio.Channel], spans: InMemorySpanExporter
) -> None:
    servicer, channel = traced_monitor
    log = PredictionLog(
        monitor_sender(channel, timeout=DRAIN), capacity=100, batch_size=4, flush_interval=NEVER
    )
    tracer = trace.get_tracer(__name__)
    log.offer(lambda: one(0))  # served outside any trace
    predictions = []
    for index in (1, 2, 3):
        with tracer.start_as_current_span(f"ModelInfer {index}") as call:
            log.offer(partial(one, index))
        predictions.append(call.get_span_context())
    for index in range(4, 8):  # a batch of untraced predictions only
        log.offer(partial(one, index))
    log.start()
    await log.close(DRAIN)
    assert [len(batch) for batch in servicer.batches] == [4, 4]

    finished = spans.get_finished_spans()
    [send] = [span for span in finished if span.name == SEND_SPAN]
    first, *others = predictions
    assert send.parent is not None
    assert (send.context.trace_id, send.parent.span_id) == (first.trace_id, first.span_id)
    assert [link.context for link in send.links] == others
    assert dict(send.attributes or {}) == {
        "conveyor.prediction_log.records": 4,
        "conveyor.prediction_log.predictions": 3,
    }
    # The call to the monitor is the send span's child: the monitor continues
    # the first prediction's trace.
    [rpc] = [
        span
        for span in finished
        if span.name == "/conveyor.monitor.v1.MonitorService/BatchLogPredictions"
        and span.parent is not None
        and span.parent.span_id == send.context.span_id
    ]
    assert servicer.traceparents[0].startswith(
        f"00-{first.trace_id:032x}-{rpc.context.span_id:016x}-"
    )
    # Untraced predictions join no trace of theirs (the call starts its own).
    assert all(f"{p.trace_id:032x}" not in servicer.traceparents[1] for p in predictions)


# -- failures and closing, with a scripted send ---------------------------------------


@dataclass
class ScriptedSend:
    """Fails (with each given error) on its first calls, then delivers."""

    errors: list[BaseException]
    delivered: list[list[PredictionRecord]] = field(default_factory=list)
    delivering: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, records: Sequence[PredictionRecord]) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.delivered.append(list(records))
        self.delivering.set()


async def test_sending_resumes_after_failures() -> None:
    send = ScriptedSend([RuntimeError("monitor restarting"), asyncio.CancelledError()])
    log = PredictionLog(
        send,
        capacity=100,
        batch_size=2,
        flush_interval=NEVER,
        min_backoff=timedelta(milliseconds=1),
        max_backoff=timedelta(milliseconds=2),
        observe=_broken_observer,
    )
    log.start()
    for index in range(6):
        log.offer(partial(one, index))
    await send.delivering.wait()
    await log.close(DRAIN)
    stats = log.statistics
    # A CancelledError from the send (grpc.aio's answer when its channel
    # closes under a call) is a failed send, not the end of the log.
    assert (stats.failed_sends, stats.dropped_failed, stats.sent) == (2, 4, 2)
    assert [[r.request_id for r in batch] for batch in send.delivered] == [["req-4", "req-5"]]


async def test_close_gives_up_on_a_send_that_never_ends() -> None:
    held = asyncio.Event()

    async def hangs(records: Sequence[PredictionRecord]) -> None:
        held.set()
        await asyncio.Event().wait()

    log = PredictionLog(hangs, capacity=100, batch_size=3, flush_interval=NEVER)
    log.start()
    for index in range(7):
        log.offer(partial(one, index))
    await held.wait()
    await log.close(timedelta(milliseconds=20))
    stats = log.statistics
    assert (stats.sent, stats.dropped_closed, stats.buffered) == (0, 7, 0)


async def test_close_without_start_drops_what_is_buffered() -> None:
    log = PredictionLog(_never_called, capacity=100, batch_size=3, flush_interval=NEVER)
    log.offer(lambda: one(1))
    await log.close(DRAIN)
    assert (log.statistics.dropped_closed, log.statistics.buffered) == (1, 0)


async def _never_called(records: Sequence[PredictionRecord]) -> None:
    raise AssertionError("nothing should have been sent")


def _broken_observer(records: Sequence[PredictionRecord], outcome: Outcome) -> None:
    raise RuntimeError("the metrics are broken")
