"""The ``/metrics`` HTTP endpoint Prometheus scrapes, serving one registry.

Prometheus scrapes HTTP in its text exposition format, so a service's metrics
are not a gRPC method: :func:`start_metrics_server` serves a
``prometheus_client.CollectorRegistry`` on its own port (9100 plus the last
digit of the service's gRPC port by default, see :mod:`conveyor.shared.ports`)
from a daemon thread, one thread per scrape, and answers 404 on any other path.
The inference and monitor services both serve their metrics through it.

Needs prometheus-client, which the ``inference`` and ``monitor`` extras
install; nothing in the light client imports this module.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app

METRICS_PATH: Final = "/metrics"


class MetricsServer:
    """The ``/metrics`` HTTP server, serving from a daemon thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]
        """The port it listens on (the real one when port 0 was asked for)."""

    def close(self) -> None:
        """Stops serving and frees the port (returns within a poll interval)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_metrics_server(listen: str, registry: CollectorRegistry) -> MetricsServer:
    """Serves ``registry`` at ``http://{listen}/metrics``; ``listen`` is
    ``host:port`` (``[::]:9104`` for IPv6, port 0 for any free port).

    Raises ValueError for an address that is not ``host:port`` and OSError when
    the port cannot be bound."""
    host, port = _parse_listen(listen)
    server_class = _Server6 if ":" in host else _Server
    server = make_server(
        host, port, _metrics_only(registry), server_class, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": _POLL_INTERVAL_S},
        name="metrics-http",
        daemon=True,
    )
    thread.start()
    return MetricsServer(server, thread)


# -- helpers --------------------------------------------------------------------------

_POLL_INTERVAL_S: Final = 0.1
"""How often the HTTP thread checks for shutdown (bounds how long close() takes)."""


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per scrape, so a slow scraper never holds up another."""

    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: a scrape every few seconds would flood the log."""


def _metrics_only(registry: CollectorRegistry) -> WSGIApplication:
    exposition: WSGIApplication = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"the metrics are at {METRICS_PATH}\n".encode()]
        return exposition(environ, start_response)

    return app


def _parse_listen(listen: str) -> tuple[str, int]:
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address {listen!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)
