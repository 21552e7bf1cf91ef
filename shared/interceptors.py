"""The server interceptor every Conveyor server runs first.

:class:`ServingInterceptor` wraps each call once, for three things:

- **Tracing**: a SERVER span per call (named like the method,
  ``/pkg.Service/Method``, with ``rpc.*`` attributes and the gRPC status),
  continuing the caller's trace from its W3C ``traceparent`` metadata, current
  while the handler runs so that logs, child spans and downstream calls join
  it. Methods of the untraced services (health checks) get none. Where the
  tracer provider records nothing (no exporter configured), the call still
  runs in a trace context — the caller's, or a fresh non-recording one — so
  logs and audit records carry trace ids, without the cost of a span. Services
  named in ``caller_trace_only_services`` (a data plane, where that fresh id
  would cost more than a small model's inference) get the caller's only.
- **Deadlines**: the call's deadline is recorded for
  :mod:`conveyor.shared.deadlines`, so calls made while serving inherit it.
- **Errors**: the one place where exceptions become gRPC statuses: a
  :class:`~conveyor.shared.errors.ConveyorError` becomes its canonical code
  with ``ErrorInfo``/``BadRequest`` details; anything else is a bug, logged
  with its traceback and answered as INTERNAL with only a reference id, so no
  exception text (which might hold a secret) leaves the process.

It replaces OpenTelemetry's gRPC server instrumentation, which wraps each
call in two layers and a proxy of the servicer context: on the inference hot
path that cost about as much as the inference itself.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from conveyor.shared.deadlines import serving_deadline
from conveyor.shared.errors import (
    ConveyorError,
    InternalError,
    bounded_status,
    status_trailing_metadata,
)
from conveyor.shared.telemetry import records_spans

logger = logging.getLogger(__name__)

UNREAD_REQUEST_LIMIT_BYTES = 16 * 1024 * 1024
"""How much of a failed client stream is read and dropped before answering."""


if TYPE_CHECKING:  # grpc-stubs makes these generic; at run time they are not
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


_PROPAGATED: Final = frozenset({"traceparent", "tracestate", "baggage"})


class ServingInterceptor(_ServerInterceptor):
    """Traces each call, records its deadline, maps its errors (see the module)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        untraced_services: Iterable[str] = (),
        caller_trace_only_services: Iterable[str] = (),
    ) -> None:
        self._provider = tracer_provider
        self._untraced = tuple(f"/{service}/" for service in untraced_services)
        self._caller_trace_only = tuple(f"/{service}/" for service in caller_trace_only_services)
        # Wrapped handlers by method, reused while the inner handler is the same
        # object (it is, unless an inner interceptor wraps per call).
        self._wrapped: dict[str, tuple[object, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method (the stubs deny it): gRPC says UNIMPLEMENTED
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        tracing = _NO_TRACE if method.startswith(self._untraced) else self._tracing(method)
        for kind, make_handler, guard in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped: grpc.RpcMethodHandler[Any, Any] = make_handler(
                    guard(behavior, method, tracing),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
                self._wrapped[method] = (handler, wrapped)
                return wrapped
        return handler

    def _tracing(self, method: str) -> _Tracing:
        # Resolved at a method's first call, when the global provider is installed.
        provider = self._provider or trace.get_tracer_provider()
        return _Tracing(
            trace.get_tracer(__name__, tracer_provider=provider),
            recording=records_spans(provider),
            fresh_ids=not method.startswith(self._caller_trace_only),
        )


@dataclass(frozen=True)
class _Tracing:
    """How a method's calls are traced: ``tracer`` None for none at all;
    where nothing is recorded, ``fresh_ids`` for a new trace context when the
    caller sent none."""

    tracer: trace.Tracer | None
    recording: bool
    fresh_ids: bool


_NO_TRACE: Final = _Tracing(None, recording=False, fresh_ids=False)


class _CallSpan:
    """A call's server span, made current for the handler, ended with its status."""

    def __init__(
        self, tracing: _Tracing, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self.span: Span | None = None
        self._token: object = None
        self._failed = False
        tracer = tracing.tracer
        if tracer is None:
            return
        carrier = {
            key: value
            for key, value in (context.invocation_metadata() or ())
            if key in _PROPAGATED and isinstance(value, str)
        }
        parent = propagate.extract(carrier) if carrier else None
        if not tracing.recording:
            if parent is None or not trace.get_current_span(parent).get_span_context().is_valid:
                if not tracing.fresh_ids:
                    return
                parent = trace.set_span_in_context(_fresh_span())
            self._token = otel_context.attach(parent)
            return
        service, _, name = method[1:].partition("/")
        self.span = tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        self._token = otel_context.attach(trace.set_span_in_context(self.span, parent))

    def failed(self, code: grpc.StatusCode, description: str) -> None:
        self._failed = True
        if self.span is not None:
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            self.span.set_status(Status(StatusCode.ERROR, f"{code.name}: {description}"))

    def end(self) -> None:
        if self._token is not None:
            # A stream's generator may be closed from another context than the
            # one that attached: the span still ends, only the detach is moot there.
            with contextlib.suppress(ValueError):
                otel_context.detach(self._token)  # type: ignore[arg-type]
        if self.span is None:
            return
        if not self._failed:
            self.span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
        self.span.end()


def _fresh_span() -> trace.Span:
    """A new trace's non-recording span: its ids for logs and audit records."""
    return trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=random.getrandbits(128),
            span_id=random.getrandbits(64),
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
        )
    )


async def abort_with_error(
    context: grpc.aio.ServicerContext[Any, Any], error: ConveyorError
) -> None:
    """End the call with ``error``'s code, message and rich details."""
    status = bounded_status(error.to_status())
    await context.abort(
        error.code, status.message, trailing_metadata=status_trailing_metadata(status)
    )


def _guard_unary(
    behavior: Callable[..., Any], method: str, tracing: _Tracing
) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _CallSpan(tracing, method, context)
        try:
            with serving_deadline(context.time_remaining()):
                try:
                    return await behavior(request, context)
                except Exception as error:  # the one place that maps every error
                    await _abort_for(error, context, method, call)
                    raise  # unreachable: abort raises
        finally:
            call.end()

    return guarded


def _guard_client_stream(
    behavior: Callable[..., Any], method: str, tracing: _Tracing
) -> Callable[..., Any]:
    """Like :func:`_guard_unary`, for handlers that read a request stream."""

    async def guarded(requests: AsyncIterator[Any], context: Any) -> Any:
        call = _CallSpan(tracing, method, context)
        try:
            with serving_deadline(context.time_remaining()):
                try:
                    return await behavior(requests, context)
                except Exception as error:  # the one place that maps every error
                    # Ending the call while the client still sends makes grpc.aio
                    # clients report INTERNAL ("Internal error from Core") instead
                    # of this status: take in what is on its way (bounded) first.
                    await _discard(requests, limit_bytes=UNREAD_REQUEST_LIMIT_BYTES)
                    await _abort_for(error, context, method, call)
                    raise
        finally:
            call.end()

    return guarded


async def _discard(requests: AsyncIterator[Any], *, limit_bytes: int) -> None:
    received = 0
    with contextlib.suppress(Exception):
        async for request in requests:
            received += request.ByteSize() if hasattr(request, "ByteSize") else len(request)
            if received >= limit_bytes:
                return


def _guard_stream(
    behavior: Callable[..., Any], method: str, tracing: _Tracing
) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        # A handler that writes with context.write() returns a coroutine.
        return _guard_unary(behavior, method, tracing)

    async def guarded(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        call = _CallSpan(tracing, method, context)
        try:
            with serving_deadline(context.time_remaining()):
                try:
                    async for response in behavior(request, context):
                        yield response
                except Exception as error:  # the one place that maps every error
                    await _abort_for(error, context, method, call)
                    raise
        finally:
            call.end()

    return guarded


_HANDLER_KINDS: tuple[tuple[str, Callable[..., Any], Callable[..., Any]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, _guard_unary),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, _guard_client_stream),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, _guard_stream),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, _guard_stream),
)


async def _abort_for(
    error: Exception, context: grpc.aio.ServicerContext[Any, Any], method: str, call: _CallSpan
) -> None:
    if isinstance(error, grpc.aio.AbortError):
        raise error  # the handler aborted on purpose: its status stands
    if isinstance(error, ConveyorError) and not isinstance(error, InternalError):
        logger.info(
            "call failed",
            extra={"method": method, "code": error.code.name, "reason": error.reason},
        )
        if call.span is not None:
            call.span.set_attribute("conveyor.error.reason", error.reason)
        call.failed(error.code, error.reason)
        await abort_with_error(context, error)
        return
    if isinstance(error, NotImplementedError):
        # The generated servicer base classes raise it for methods a server lacks.
        call.failed(grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED")
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"this server does not offer {method}")
    reference = uuid.uuid4().hex[:12]
    call.failed(grpc.StatusCode.INTERNAL, f"reference {reference}")
    # The traceback stays in this process's log; the caller gets a reference only.
    logger.error("internal error", exc_info=error, extra={"method": method, "reference": reference})
    await abort_with_error(
        context,
        InternalError(
            f"internal error (reference {reference})",
            reason="INTERNAL",
            metadata={"reference": reference},
        ),
    )
