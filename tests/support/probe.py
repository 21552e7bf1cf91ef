"""A small gRPC service for testing the shared runtime through real calls.

It is registered with a generic handler, so it needs no contract of its own.
Its methods sleep, fail on request, stream, report the trace context they see
and forward calls to another server (deadline propagation).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2, empty_pb2, struct_pb2, wrappers_pb2
from opentelemetry import trace

from conveyor.shared import deadlines, errors
from conveyor.shared.channel import create_channel
from conveyor.shared.server import ServiceRegistration

SERVICE = "conveyor.testing.v1.ProbeService"

_FAILURES: dict[str, errors.ConveyorError | Exception] = {
    "not_found": errors.NotFoundError(
        "model models/x not found", reason="MODEL_NOT_FOUND", metadata={"name": "models/x"}
    ),
    "invalid": errors.InvalidArgumentError(
        "bad request",
        violations=[errors.FieldViolation("spec.epochs", "must be positive")],
    ),
    "exhausted": errors.ResourceExhaustedError("queue full", reason="QUEUE_FULL"),
    "bug": KeyError("secret-token-123"),
}


class Probe:
    """State the tests inspect: finished sleeps and the deadlines observed."""

    def __init__(self) -> None:
        self.completed_sleeps = 0
        self.sleep_started = asyncio.Event()
        self.seen_time_remaining: list[float | None] = []
        self.forward_target: str | None = None

    async def sleep(self, request: duration_pb2.Duration, context: Any) -> empty_pb2.Empty:
        self.seen_time_remaining.append(context.time_remaining())
        self.sleep_started.set()
        await asyncio.sleep(request.ToTimedelta().total_seconds())
        self.completed_sleeps += 1
        return empty_pb2.Empty()

    async def fail(self, request: wrappers_pb2.StringValue, context: Any) -> empty_pb2.Empty:
        raise _FAILURES[request.value]

    async def count(
        self, request: wrappers_pb2.Int32Value, context: Any
    ) -> AsyncIterator[wrappers_pb2.Int32Value]:
        for i in range(abs(request.value)):
            yield wrappers_pb2.Int32Value(value=i)
        if request.value < 0:
            raise errors.FailedPreconditionError("stream refused midway", reason="MIDWAY")

    async def whoami(self, request: empty_pb2.Empty, context: Any) -> struct_pb2.Struct:
        span = trace.get_current_span().get_span_context()
        result = struct_pb2.Struct()
        result.update(
            {
                "trace_id": format(span.trace_id, "032x"),
                "remaining": deadlines.remaining() or -1.0,
                "authorization": dict(context.invocation_metadata()).get("authorization", ""),
            }
        )
        return result

    async def relay(self, request: empty_pb2.Empty, context: Any) -> struct_pb2.Struct:
        """Calls WhoAmI on ``forward_target`` with no timeout of its own."""
        assert self.forward_target is not None
        async with create_channel(self.forward_target, default_timeout=None) as channel:
            reply: struct_pb2.Struct = await ProbeClient(channel).whoami(empty_pb2.Empty())
            return reply

    def registration(self, *, fresh_trace_ids: bool = True) -> ServiceRegistration:
        handlers = {
            "Sleep": grpc.unary_unary_rpc_method_handler(
                self.sleep,
                request_deserializer=duration_pb2.Duration.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString,
            ),
            "Fail": grpc.unary_unary_rpc_method_handler(
                self.fail,
                request_deserializer=wrappers_pb2.StringValue.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString,
            ),
            "Count": grpc.unary_stream_rpc_method_handler(
                self.count,
                request_deserializer=wrappers_pb2.Int32Value.FromString,
                response_serializer=wrappers_pb2.Int32Value.SerializeToString,
            ),
            "WhoAmI": grpc.unary_unary_rpc_method_handler(
                self.whoami,
                request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=struct_pb2.Struct.SerializeToString,
            ),
            "Relay": grpc.unary_unary_rpc_method_handler(
                self.relay,
                request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=struct_pb2.Struct.SerializeToString,
            ),
        }
        generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
        return ServiceRegistration(
            full_name=SERVICE,
            add_to_server=lambda s: s.add_generic_rpc_handlers((generic,)),
            fresh_trace_ids=fresh_trace_ids,
        )


class ProbeClient:
    """Typed callables for the probe's methods over a channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.sleep = channel.unary_unary(
            f"/{SERVICE}/Sleep",
            request_serializer=duration_pb2.Duration.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        self.fail = channel.unary_unary(
            f"/{SERVICE}/Fail",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=empty_pb2.Empty.FromString,
        )
        self.count = channel.unary_stream(
            f"/{SERVICE}/Count",
            request_serializer=wrappers_pb2.Int32Value.SerializeToString,
            response_deserializer=wrappers_pb2.Int32Value.FromString,
        )
        self.relay = channel.unary_unary(
            f"/{SERVICE}/Relay",
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=struct_pb2.Struct.FromString,
        )
        self.whoami = channel.unary_unary(
            f"/{SERVICE}/WhoAmI",
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=struct_pb2.Struct.FromString,
        )


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration
