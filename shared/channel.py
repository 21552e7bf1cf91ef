"""Client channels: every call gets a deadline, idempotent calls are retried.

This module needs only grpcio and protobuf (OpenTelemetry is used when it is
installed), so backends get it with the light client.

- **Deadlines**: a unary call that names no timeout gets ``default_timeout``; a
  unary call made while serving another is capped at what remains of that call's
  deadline (:mod:`conveyor.shared.deadlines`). Streaming calls (watches,
  transfers) run until the timeout they name.
- **Retries**: methods that the contracts mark ``idempotency_level =
  NO_SIDE_EFFECTS`` or ``IDEMPOTENT`` are retried on UNAVAILABLE with backoff,
  through gRPC's own retry service config.
- **TLS / mTLS** when a CA (and optionally a client certificate) is given.
- **Bearer token** in the ``authorization`` metadata when one is given: a fixed
  ``bearer_token``, or a ``token_provider`` asked on every call (a service's own
  short-lived tokens, renewed before they expire).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor

from conveyor.shared.deadlines import effective_timeout

MIB = 1024 * 1024

_RETRYABLE_LEVELS = (
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
)


@dataclass(frozen=True)
class ClientTLS:
    """PEM material for TLS to Conveyor services; a certificate and key add mTLS."""

    root_certificates: bytes
    certificate_chain: bytes | None = None
    private_key: bytes | None = None


def create_channel(
    target: str,
    *,
    services: Iterable[ServiceDescriptor] = (),
    default_timeout: timedelta | None = timedelta(seconds=30),
    tls: ClientTLS | None = None,
    bearer_token: str | None = None,
    token_provider: Callable[[], str] | None = None,
    max_message_bytes: int = 16 * MIB,
    tracing: bool = True,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` (``host:port``).

    ``services`` are the descriptors of the services called over it; their
    idempotent methods get the retry policy. ``bearer_token`` or
    ``token_provider`` (called for each call; not both) sets the
    ``authorization`` metadata.
    """
    if bearer_token is not None and token_provider is not None:
        raise ValueError("pass bearer_token or token_provider, not both")
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(services)),
    ]
    chain = call_details_interceptors(
        default_timeout=None if default_timeout is None else default_timeout.total_seconds(),
        bearer_token=bearer_token,
        token_provider=token_provider,
    )
    if tracing:
        chain.extend(_tracing_interceptors())
    chain.extend(interceptors)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=chain)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=chain)


def retry_service_config(services: Iterable[ServiceDescriptor]) -> str:
    """gRPC service config JSON retrying the idempotent methods of ``services``."""
    names = [
        {"service": service.full_name, "method": method.name}
        for service in services
        for method in service.methods
        if method.GetOptions().idempotency_level in _RETRYABLE_LEVELS
    ]
    if not names:
        return json.dumps({})
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": names,
                    "retryPolicy": {
                        "maxAttempts": 4,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


if TYPE_CHECKING:  # grpc-stubs makes these generic; at run time they are not
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor


def call_details_interceptors(
    *,
    default_timeout: float | None,
    bearer_token: str | None = None,
    token_provider: Callable[[], str] | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per call kind, sharing a :class:`CallDetails`.

    One object per kind, because ``grpc.aio`` files an interceptor under the
    first call kind it implements only: an object implementing all four would
    never see a streaming call (which then went without its token).
    """
    call = CallDetails(
        default_timeout=default_timeout,
        bearer_token=bearer_token,
        token_provider=token_provider,
    )
    interceptors: list[Any] = [
        _UnaryUnaryDetails(call),
        _UnaryStreamDetails(call),
        _StreamUnaryDetails(call),
        _StreamStreamDetails(call),
    ]
    return interceptors


class CallDetails:
    """What every call gets: its token, and for unary calls a timeout (the default,
    capped by the deadline of the call being served)."""

    def __init__(
        self,
        *,
        default_timeout: float | None,
        bearer_token: str | None = None,
        token_provider: Callable[[], str] | None = None,
    ) -> None:
        self._default_timeout = default_timeout
        self._auth = (("authorization", f"Bearer {bearer_token}"),) if bearer_token else ()
        self._token_provider = token_provider

    def __repr__(self) -> str:  # never show the token
        return f"CallDetails(default_timeout={self._default_timeout!r})"

    def _authorization(self) -> tuple[tuple[str, str], ...]:
        if self._token_provider is None:
            return self._auth
        return (("authorization", f"Bearer {self._token_provider()}"),)

    def unary(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        """``details`` with the token and the effective timeout."""
        return self._with(details, effective_timeout(details.timeout, self._default_timeout))

    def streaming(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        """``details`` with the token; the timeout stays the caller's."""
        return self._with(details, details.timeout)

    def _with(
        self, details: grpc.aio.ClientCallDetails, timeout: float | None
    ) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._authorization())
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )


class _UnaryUnaryDetails(_UnaryUnary):
    def __init__(self, call: CallDetails) -> None:
        self._call = call

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._call.unary(details), request)


class _UnaryStreamDetails(_UnaryStream):
    def __init__(self, call: CallDetails) -> None:
        self._call = call

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._call.streaming(details), request)


class _StreamUnaryDetails(_StreamUnary):
    def __init__(self, call: CallDetails) -> None:
        self._call = call

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._call.streaming(details), request_iterator)


class _StreamStreamDetails(_StreamStream):
    def __init__(self, call: CallDetails) -> None:
        self._call = call

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._call.streaming(details), request_iterator)


def _tracing_interceptors() -> list[grpc.aio.ClientInterceptor]:
    try:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
    except ImportError:  # the light client runs without OpenTelemetry
        return []
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors()  # type: ignore[no-untyped-call]
    return interceptors
