"""Client channels: every call gets a deadline, idempotent calls are retried.

This module needs only grpcio and protobuf (OpenTelemetry is used when it is
installed), so backends get it with the light client.

- **Deadlines**: a call that names no timeout gets ``default_timeout``; a call
  made while serving another is capped at what remains of that call's deadline
  (:mod:`conveyor.shared.deadlines`).
- **Retries**: methods that the contracts mark ``idempotency_level =
  NO_SIDE_EFFECTS`` or ``IDEMPOTENT`` are retried on UNAVAILABLE with backoff,
  through gRPC's own retry service config.
- **TLS / mTLS** when a CA (and optionally a client certificate) is given.
- **Bearer token** in the ``authorization`` metadata when one is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

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
    max_message_bytes: int = 16 * MIB,
    tracing: bool = True,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` (``host:port``).

    ``services`` are the descriptors of the services called over it; their
    idempotent methods get the retry policy.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(services)),
    ]
    call_details = CallDetailsInterceptor(
        default_timeout=None if default_timeout is None else default_timeout.total_seconds(),
        bearer_token=bearer_token,
    )
    chain: list[grpc.aio.ClientInterceptor] = [cast(grpc.aio.ClientInterceptor, call_details)]
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


class CallDetailsInterceptor(_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream):
    """Sets each call's timeout (default, capped by the served deadline) and token."""

    def __init__(self, *, default_timeout: float | None, bearer_token: str | None) -> None:
        self._default_timeout = default_timeout
        self._auth = (("authorization", f"Bearer {bearer_token}"),) if bearer_token else ()

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._auth)
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=effective_timeout(details.timeout, self._default_timeout),
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)


def _tracing_interceptors() -> list[grpc.aio.ClientInterceptor]:
    try:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
    except ImportError:  # the light client runs without OpenTelemetry
        return []
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors()  # type: ignore[no-untyped-call]
    return interceptors
