"""Server interceptors every Conveyor server runs.

:class:`ErrorMappingInterceptor` is the one place where exceptions become gRPC
statuses: a :class:`~conveyor.shared.errors.ConveyorError` becomes its canonical
code with ``ErrorInfo``/``BadRequest`` details; anything else is a bug, logged
with its traceback and answered as INTERNAL with only a reference id, so no
exception text (which might hold a secret) leaves the process. It also records
the call's deadline for :mod:`conveyor.shared.deadlines`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace

from conveyor.shared.deadlines import serving_deadline
from conveyor.shared.errors import ConveyorError, InternalError, status_trailing_metadata

logger = logging.getLogger(__name__)

UNREAD_REQUEST_LIMIT_BYTES = 16 * 1024 * 1024
"""How much of a failed client stream is read and dropped before answering."""


if TYPE_CHECKING:  # grpc-stubs makes these generic; at run time they are not
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class ErrorMappingInterceptor(_ServerInterceptor):
    """Maps exceptions raised by handlers to canonical statuses with details."""

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method (the stubs deny it): gRPC says UNIMPLEMENTED
            return None
        method = handler_call_details.method
        for kind, make_handler, guard in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is not None:
                wrapped: grpc.RpcMethodHandler[Any, Any] = make_handler(
                    guard(behavior, method),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
                return wrapped
        return handler


async def abort_with_error(
    context: grpc.aio.ServicerContext[Any, Any], error: ConveyorError
) -> None:
    """End the call with ``error``'s code, message and rich details."""
    await context.abort(
        error.code,
        error.message,
        trailing_metadata=status_trailing_metadata(error.to_status()),
    )


def _guard_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with serving_deadline(context.time_remaining()):
            try:
                return await behavior(request, context)
            except Exception as error:  # the one place that maps every error
                await _abort_for(error, context, method)
                raise  # unreachable: abort raises

    return guarded


def _guard_client_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """Like :func:`_guard_unary`, for handlers that read a request stream."""

    async def guarded(requests: AsyncIterator[Any], context: Any) -> Any:
        with serving_deadline(context.time_remaining()):
            try:
                return await behavior(requests, context)
            except Exception as error:  # the one place that maps every error
                # Ending the call while the client still sends makes grpc.aio
                # clients report INTERNAL ("Internal error from Core") instead of
                # this status: take in what is on its way (bounded) first.
                await _discard(requests, limit_bytes=UNREAD_REQUEST_LIMIT_BYTES)
                await _abort_for(error, context, method)
                raise

    return guarded


async def _discard(requests: AsyncIterator[Any], *, limit_bytes: int) -> None:
    received = 0
    with contextlib.suppress(Exception):
        async for request in requests:
            received += request.ByteSize() if hasattr(request, "ByteSize") else len(request)
            if received >= limit_bytes:
                return


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        # A handler that writes with context.write() returns a coroutine.
        return _guard_unary(behavior, method)

    async def guarded(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        with serving_deadline(context.time_remaining()):
            try:
                async for response in behavior(request, context):
                    yield response
            except Exception as error:  # the one place that maps every error
                await _abort_for(error, context, method)
                raise

    return guarded


_HANDLER_KINDS: tuple[tuple[str, Callable[..., Any], Callable[..., Any]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, _guard_unary),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, _guard_client_stream),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, _guard_stream),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, _guard_stream),
)


async def _abort_for(
    error: Exception, context: grpc.aio.ServicerContext[Any, Any], method: str
) -> None:
    if isinstance(error, grpc.aio.AbortError):
        raise error  # the handler aborted on purpose: its status stands
    if isinstance(error, ConveyorError) and not isinstance(error, InternalError):
        logger.info(
            "call failed",
            extra={"method": method, "code": error.code.name, "reason": error.reason},
        )
        trace.get_current_span().set_attribute("conveyor.error.reason", error.reason)
        await abort_with_error(context, error)
        return
    if isinstance(error, NotImplementedError):
        # The generated servicer base classes raise it for methods a server lacks.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"this server does not offer {method}")
    reference = uuid.uuid4().hex[:12]
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
