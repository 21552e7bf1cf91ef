"""Fixtures every test shares: a clean environment (carrying the run's canary
secret), an in-memory trace sink, and the secret leak watch over the whole run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import canary

_SPANS = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_SPANS))
# OpenTelemetry allows one global provider per process: install it once, here.
trace.set_tracer_provider(_PROVIDER)
# Watch every log record, span and server error of the run for secrets.
canary.install(_PROVIDER, pytest.MonkeyPatch())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    canary.report(session)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a CONVEYOR_* or OTEL_* variable it did not set itself."""
    for name in list(os.environ):
        if name.startswith(("CONVEYOR_", "OTEL_")):
            monkeypatch.delenv(name)
    for name, value in canary.CANARY_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Finished spans of this test (the process-wide provider's in-memory sink)."""
    _SPANS.clear()
    yield _SPANS
    _SPANS.clear()
