"""The shared server runtime, exercised through real channels on port 0."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2, wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor.shared import errors
from conveyor.shared.channel import create_channel
from conveyor.shared.server import ConveyorServer, create_server
from conveyor.shared.telemetry import create_tracer_provider, records_spans
from tests.support.probe import SERVICE, Probe, ProbeClient, seconds
from tests.support.settings import TestServerSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# gRPC rounds a timeout up when it encodes it in the grpc-timeout header, so the
# server can see a little more time than the client asked for.
DEADLINE_WIRE_SLACK_S = 1.0


@pytest.fixture
async def probe(tmp_path: Path) -> AsyncIterator[tuple[ConveyorServer, Probe]]:
    probe = Probe()
    settings = TestServerSettings(
        data_dir=tmp_path, shutdown_grace=timedelta(seconds=5), max_receive_message_bytes=64 * 1024
    )
    server = await create_server(settings, [probe.registration()])
    yield server, probe
    await server.server.stop(None)


def target(server: ConveyorServer) -> str:
    return f"127.0.0.1:{server.port}"


async def test_health_reports_serving_per_service(probe: tuple[ConveyorServer, Probe]) -> None:
    server, _ = probe
    async with grpc.aio.insecure_channel(target(server)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == SERVING
        await server.set_serving(SERVICE, False)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert reply.status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(
    probe: tuple[ConveyorServer, Probe],
) -> None:
    server, state = probe
    serving = asyncio.create_task(server.serve_until_signal())
    async with grpc.aio.insecure_channel(target(server)) as channel:
        client = ProbeClient(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
        )
        assert (await watch.read()).status == SERVING
        in_flight = asyncio.ensure_future(client.sleep(seconds(1.0), timeout=10))
        await asyncio.wait_for(state.sleep_started.wait(), 5)

        os.kill(os.getpid(), signal.SIGTERM)

        assert (await watch.read()).status == NOT_SERVING
        await asyncio.sleep(0.2)  # the server has stopped accepting calls
        async with grpc.aio.insecure_channel(target(server)) as fresh:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ProbeClient(fresh).sleep(seconds(0), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await in_flight  # completes normally during the drain
        assert state.completed_sleeps == 1
    await asyncio.wait_for(serving, 10)


@pytest.mark.parametrize(
    ("failure", "code", "reason"),
    [
        ("not_found", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL"),
    ],
)
async def test_domain_errors_map_to_codes_with_error_info(
    probe: tuple[ConveyorServer, Probe], failure: str, code: grpc.StatusCode, reason: str
) -> None:
    server, _ = probe
    async with grpc.aio.insecure_channel(target(server)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await ProbeClient(channel).fail(wrappers_pb2.StringValue(value=failure), timeout=5)
    assert raised.value.code() == code
    error = errors.from_rpc_error(raised.value)
    assert error.reason == reason
    status = errors.rich_status(raised.value)
    assert status is not None
    assert status.code == code.value[0]
    if failure == "not_found":
        assert error.metadata == {"name": "models/x"}
    if failure == "invalid":
        assert isinstance(error, errors.InvalidArgumentError)
        assert error.violations == (errors.FieldViolation("spec.epochs", "must be positive"),)


async def test_a_bug_is_internal_and_hides_its_message(
    probe: tuple[ConveyorServer, Probe], caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = probe
    async with grpc.aio.insecure_channel(target(server)) as channel:
        client = ProbeClient(channel)
        with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.fail(wrappers_pb2.StringValue(value="bug"), timeout=5)
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert "secret-token-123" not in (raised.value.details() or "")
        reference = errors.from_rpc_error(raised.value).metadata["reference"]
        assert reference in (raised.value.details() or "")
        assert any(getattr(r, "reference", None) == reference for r in caplog.records)
        # The service is still healthy and answering afterwards.
        assert (await client.whoami(empty_pb2.Empty(), timeout=5)).fields


async def test_streams_map_errors_after_partial_results(
    probe: tuple[ConveyorServer, Probe],
) -> None:
    server, _ = probe
    async with grpc.aio.insecure_channel(target(server)) as channel:
        client = ProbeClient(channel)
        assert [r.value async for r in client.count(wrappers_pb2.Int32Value(value=3))] == [0, 1, 2]
        received: list[int] = []

        async def read_all() -> None:
            async for reply in client.count(wrappers_pb2.Int32Value(value=-2), timeout=5):
                received.append(reply.value)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read_all()
    assert received == [0, 1]
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert errors.from_rpc_error(raised.value).reason == "MIDWAY"


async def test_oversized_request_is_refused_and_server_stays_up(
    probe: tuple[ConveyorServer, Probe],
) -> None:
    server, _ = probe
    async with grpc.aio.insecure_channel(target(server)) as channel:
        client = ProbeClient(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.fail(wrappers_pb2.StringValue(value="x" * 100_000), timeout=5)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await client.whoami(empty_pb2.Empty(), timeout=5)).fields


async def test_unknown_method_is_unimplemented(probe: tuple[ConveyorServer, Probe]) -> None:
    server, _ = probe
    async with grpc.aio.insecure_channel(target(server)) as channel:
        call = channel.unary_unary(f"/{SERVICE}/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_callers_trace_reaches_the_server_span(
    probe: tuple[ConveyorServer, Probe], spans: InMemorySpanExporter
) -> None:
    server, _ = probe
    tracer = trace.get_tracer("test")
    async with create_channel(target(server)) as channel:
        with tracer.start_as_current_span("caller") as caller:
            reply = await ProbeClient(channel).whoami(empty_pb2.Empty())
    trace_id = caller.get_span_context().trace_id
    assert reply.fields["trace_id"].string_value == format(trace_id, "032x")
    server_spans = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert [s.name for s in server_spans] == [f"/{SERVICE}/WhoAmI"]
    assert server_spans[0].context.trace_id == trace_id
    client_spans = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]
    assert server_spans[0].parent is not None
    assert server_spans[0].parent.span_id == client_spans[0].context.span_id


@pytest.mark.parametrize("fresh_trace_ids", [True, False])
async def test_without_an_exporter_a_call_keeps_its_callers_trace_and_no_span_is_made(
    tmp_path: Path, spans: InMemorySpanExporter, fresh_trace_ids: bool
) -> None:
    provider = create_tracer_provider("probe")  # nowhere to export to
    assert not records_spans(provider)
    server = await create_server(
        TestServerSettings(data_dir=tmp_path),
        [Probe().registration(fresh_trace_ids=fresh_trace_ids)],
        tracer_provider=provider,
    )
    try:
        # A bare channel sends no trace context; Conveyor's sends its caller's.
        async with grpc.aio.insecure_channel(target(server)) as bare:
            alone = [await ProbeClient(bare).whoami(empty_pb2.Empty()) for _ in range(2)]
        async with create_channel(target(server)) as channel:
            with trace.get_tracer("test").start_as_current_span("caller") as caller:
                joined = await ProbeClient(channel).whoami(empty_pb2.Empty())
    finally:
        await server.server.stop(None)
    caller_trace = format(caller.get_span_context().trace_id, "032x")
    assert joined.fields["trace_id"].string_value == caller_trace
    alone_traces = [reply.fields["trace_id"].string_value for reply in alone]
    if fresh_trace_ids:
        # A trace id of its own for each call, for its logs and audit records.
        assert all(int(trace_id, 16) for trace_id in alone_traces)
        assert len(set(alone_traces)) == 2
    else:
        assert alone_traces == ["0" * 32] * 2
    assert not [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]


async def test_deadline_propagates_to_downstream_calls(
    probe: tuple[ConveyorServer, Probe], tmp_path: Path
) -> None:
    server, state = probe
    downstream_probe = Probe()
    downstream = await create_server(
        TestServerSettings(data_dir=tmp_path / "downstream"), [downstream_probe.registration()]
    )
    state.forward_target = target(downstream)
    try:
        async with create_channel(target(server)) as channel:
            reply = await ProbeClient(channel).relay(empty_pb2.Empty(), timeout=2.0)
        # The relay set no timeout; the downstream call inherited the caller's 2 s.
        assert 0 < reply.fields["remaining"].number_value <= 2.0 + DEADLINE_WIRE_SLACK_S
    finally:
        await downstream.server.stop(None)


async def test_channel_sends_bearer_token(probe: tuple[ConveyorServer, Probe]) -> None:
    server, _ = probe
    async with create_channel(target(server), bearer_token="t0ken") as channel:
        reply = await ProbeClient(channel).whoami(empty_pb2.Empty())
    assert reply.fields["authorization"].string_value == "Bearer t0ken"
    # The channel's default 30 s deadline reached the server (not "no deadline").
    assert 0 < reply.fields["remaining"].number_value <= 30.0 + DEADLINE_WIRE_SLACK_S
