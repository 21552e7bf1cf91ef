"""Tracing and structured logs.

One OpenTelemetry trace follows a request across every service: W3C trace-context
headers ride in gRPC metadata (the instrumentation's interceptors inject and
extract them), spans go to an OTLP collector when ``OTEL_EXPORTER_OTLP_ENDPOINT``
is set, and every log line carries the current trace and span ids.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

from conveyor.shared.settings import TelemetrySettings

_LOG_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def create_tracer_provider(
    service_name: str, settings: TelemetrySettings | None = None
) -> TracerProvider:
    """A tracer provider for one service, exporting where ``settings`` say.

    It is not made global here: :func:`install_tracer_provider` does that once per
    process, while tests build servers on private providers.
    """
    settings = settings or TelemetrySettings()
    exporter: SpanExporter | None = None
    if settings.otlp_endpoint:
        # Imported here: the OTLP exporter pulls in its own gRPC/protobuf stack,
        # which only processes that export need.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure
        )
    elif settings.traces_file is not None:
        exporter = JsonLinesSpanExporter(settings.traces_file)
    # With nowhere to send spans, none is recorded: calls still get trace
    # contexts (ids in logs and audit records, propagation downstream) without
    # the cost of building spans nobody reads, on every inference.
    sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio)) if exporter else ALWAYS_OFF
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"conveyor-{service_name}"}),
        sampler=sampler,
    )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def trace_client_process(settings: TelemetrySettings | None = None) -> None:
    """Give a client process (the ``conveyor`` CLI) a tracer provider, once, when
    telemetry is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``CONVEYOR_TRACES_FILE``) and the process has none of its own yet.

    Its calls then start the traces the services continue: each call's client
    span is a root, exported as ``conveyor-cli``; the provider flushes what is
    left when the process exits. A process that installed a provider (every
    server, the tests) keeps it; with nothing configured nothing is installed.
    """
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    settings = settings or TelemetrySettings()
    if not settings.otlp_endpoint and settings.traces_file is None:
        return
    install_tracer_provider(create_tracer_provider("cli", settings))


def records_spans(provider: trace.TracerProvider) -> bool:
    """Whether spans from ``provider`` can be recorded at all (not when it was
    made with nowhere to export them)."""
    return getattr(provider, "sampler", None) is not ALWAYS_OFF


def install_tracer_provider(provider: TracerProvider) -> None:
    """Make ``provider`` the process-wide default (OpenTelemetry allows this once)."""
    trace.set_tracer_provider(provider)


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line: tracing with no collector."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(span.to_json())) + "\n" for span in spans)
        with self._lock, self._path.open("a", encoding="utf-8") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, empty outside a span) to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else ""
        record.span_id = format(context.span_id, "016x") if context.is_valid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids, extras."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self._service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "service": self._service_name,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
        }
        for key, value in record.__dict__.items():
            if key not in _LOG_RECORD_FIELDS and key not in entry:
                entry[key] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(service_name: str, *, level: str = "INFO", json_lines: bool = True) -> None:
    """Route this process's logs to stderr, with trace ids, as JSON or text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter(service_name))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s {service_name} %(name)s "
                "[trace=%(trace_id)s] %(message)s"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
