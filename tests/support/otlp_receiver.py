"""An OTLP/gRPC trace receiver for tests: what an OpenTelemetry Collector's
``otlp`` receiver is to the services, in the test's own process.

It serves ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` (the
messages of the ``opentelemetry-proto`` package, the ones every OTLP exporter
sends) on a loopback port, keeps every span it receives in a plain form
(:class:`ReceivedSpan`), and lets a test wait, within a bound, until the spans
it expects have arrived: exporters send in batches, from several processes, in
no particular order.

Point a process at it with ``OTEL_EXPORTER_OTLP_ENDPOINT=<receiver.endpoint>``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

T = TypeVar("T")

AttributeValue = str | bool | int | float | bytes | tuple[Any, ...] | dict[str, Any] | None


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, ids in lowercase hex as W3C trace context writes them."""

    trace_id: str
    span_id: str
    parent_span_id: str
    """"" for a root span."""
    name: str
    kind: str
    """``SERVER``, ``CLIENT``, ``INTERNAL``, ``PRODUCER`` or ``CONSUMER``."""
    service: str
    """The ``service.name`` of the resource that exported it."""
    attributes: Mapping[str, AttributeValue]
    links: tuple[tuple[str, str], ...]
    """(trace id, span id) of each linked span."""
    status: str
    """``UNSET``, ``OK`` or ``ERROR``."""
    status_message: str

    def __str__(self) -> str:
        parent = self.parent_span_id or "root"
        return f"{self.service} {self.kind} {self.name} [{self.span_id} <- {parent}]"


class OtlpTraceReceiver:
    """A running OTLP/gRPC trace receiver (``async with`` starts and stops it)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._server: grpc.aio.Server | None = None
        self._spans: list[ReceivedSpan] = []
        self._arrived = asyncio.Event()
        self.port = 0

    async def __aenter__(self) -> OtlpTraceReceiver:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), server
        )
        self.port = server.add_insecure_port(f"{self._host}:0")
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            await self._server.stop(grace=1)
            self._server = None

    @property
    def endpoint(self) -> str:
        """The ``OTEL_EXPORTER_OTLP_ENDPOINT`` value that sends spans here."""
        return f"http://{self._host}:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order (a copy)."""
        return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace received so far."""
        return [span for span in self._spans if span.trace_id == trace_id]

    async def wait_for(
        self,
        find: Callable[[Sequence[ReceivedSpan]], T | None],
        *,
        timeout_s: float = 20.0,
        what: str = "the expected spans",
    ) -> T:
        """``find(spans)``'s first answer that is not None, asked again as spans
        arrive; AssertionError naming ``what`` and listing what did arrive if
        there is none after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            self._arrived.clear()
            found = find(self.spans)
            if found is not None:
                return found
            left = give_up - loop.time()
            if left <= 0:
                received = "\n  ".join(str(span) for span in self._spans) or "none"
                raise AssertionError(f"no {what} within {timeout_s} s; received:\n  {received}")
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                continue

    def _receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                self._spans.extend(_received(span, service) for span in scope_spans.spans)
        self._arrived.set()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpTraceReceiver) -> None:
        self._receiver = receiver

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver._receive(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _received(span: Span, service: str) -> ReceivedSpan:
    return ReceivedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        service=service,
        attributes=_attributes(span.attributes),
        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
        status=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        status_message=span.status.message,
    )


def _attributes(pairs: Sequence[KeyValue]) -> dict[str, AttributeValue]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> AttributeValue:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind is None:
        return None
    result: AttributeValue = getattr(value, kind)
    return result
