"""The server bootstrap every Conveyor service shares.

Each service writes ``async def build_server(settings) -> ConveyorServer`` that
calls :func:`create_server` with its servicers; ``conveyor serve`` and the tests
both use it. A server gets, always and in this order: gRPC health with a status
per service, server reflection, deliberate message-size limits, the interceptor
chain (the serving interceptor — tracing, deadline, error mapping — then any
extra interceptors such as authentication), TLS or mTLS when certificates are
configured, and a graceful drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # stubs predate aio
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from conveyor.shared.interceptors import ServingInterceptor
from conveyor.shared.settings import ServiceSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to host: its full name and how to add it to a server."""

    full_name: str
    """Fully qualified service name, e.g. ``conveyor.registry.v1.RegistryService``."""

    add_to_server: Callable[[grpc.aio.Server], None]
    """Registers the servicer, e.g. ``lambda s: add_RegistryServiceServicer_to_server(x, s)``."""

    fresh_trace_ids: bool = True
    """Where no exporter records spans, whether a call that brings no trace
    context gets a fresh trace id anyway (for logs and audit records). A data
    plane turns it off: that id costs more than a small model's inference."""


@dataclass
class ConveyorServer:
    """A started server: its bound port, health servicer and drain logic."""

    server: grpc.aio.Server
    port: int
    health: Any
    service_names: tuple[str, ...]
    shutdown_grace: timedelta
    shutdown_delay: timedelta
    before_stop: list[Callable[[], object]] = field(default_factory=list)
    """Run once draining has begun, before new calls are refused (end streams)."""
    on_shutdown: list[Callable[[], object]] = field(default_factory=list)
    """Run after the server has stopped (close databases)."""
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def set_serving(self, service_name: str, serving: bool) -> None:
        """Report ``service_name`` SERVING or NOT_SERVING (a dependency went down)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set(service_name, status)

    async def shutdown(self) -> None:
        """Drain: report NOT_SERVING, wait ``shutdown_delay`` so load balancers
        notice, refuse new calls, give in-flight calls ``shutdown_grace``."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        logger.info("draining", extra={"grace_s": self.shutdown_grace.total_seconds()})
        await self.health.enter_graceful_shutdown()
        if self.shutdown_delay > timedelta(0):
            await asyncio.sleep(self.shutdown_delay.total_seconds())
        await _run_all(self.before_stop)
        await self.server.stop(self.shutdown_grace.total_seconds())
        try:
            await _run_all(self.on_shutdown)
        finally:
            self._stopped.set()
        logger.info("stopped")

    async def serve_until_signal(self) -> None:
        """Run until SIGTERM or SIGINT, then drain gracefully."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(self.shutdown()))
        try:
            await self.server.wait_for_termination()
            if self._stopping.is_set():
                # The server stops before its on_shutdown work (children,
                # databases) is done: returning now would cancel that work.
                await self._stopped.wait()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)


async def create_server(
    settings: ServiceSettings,
    services: Sequence[ServiceRegistration],
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    tracer_provider: TracerProvider | None = None,
    reuse_port: bool = False,
) -> ConveyorServer:
    """Create, bind and start a server hosting ``services``.

    ``interceptors`` run inside error mapping, so an authentication interceptor
    can raise :class:`~conveyor.shared.errors.UnauthenticatedError` from its
    handler and get a proper status. ``tracer_provider`` defaults to the global one.
    ``reuse_port`` lets several processes of one service share the port
    (``SO_REUSEPORT``); otherwise a port in use is an error.
    """
    server = grpc.aio.server(
        interceptors=[
            # Health checks are not traced: they are noise.
            ServingInterceptor(
                tracer_provider,
                untraced_services=[health.SERVICE_NAME],
                caller_trace_only_services=[s.full_name for s in services if not s.fresh_trace_ids],
            ),
            *interceptors,
        ],
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", settings.max_send_message_bytes),
            # Two servers must never share a port silently, unless asked to.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    for service in services:
        service.add_to_server(server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(s.full_name for s in services)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = _bind(server, settings)
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("serving", extra={"services": ",".join(names), "port": port})
    return ConveyorServer(
        server=server,
        port=port,
        health=health_servicer,
        service_names=names,
        shutdown_grace=settings.shutdown_grace,
        shutdown_delay=settings.shutdown_delay,
    )


async def _run_all(callbacks: list[Callable[[], object]]) -> None:
    for callback in callbacks:
        result = callback()
        if asyncio.iscoroutine(result):
            await result


def _bind(server: grpc.aio.Server, settings: ServiceSettings) -> int:
    if settings.tls_enabled:
        assert settings.tls_cert_file is not None
        assert settings.tls_key_file is not None
        client_ca = settings.tls_client_ca_file
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
            root_certificates=client_ca.read_bytes() if client_ca else None,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(settings.listen, credentials)
    else:
        port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"could not bind {settings.listen}")
    return port
