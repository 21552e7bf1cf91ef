"""Settings from the environment, structured logs with trace ids, the SQL engine."""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
import sqlalchemy
from opentelemetry import trace
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from conveyor.shared.settings import ClientSettings, ServiceSettings, TelemetrySettings
from conveyor.shared.storage.database import create_engine, sqlite_url
from conveyor.shared.telemetry import JsonFormatter, TraceContextFilter, create_tracer_provider


class RegistryLikeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_REGISTRYLIKE_")
    service_name: ClassVar[str] = "registrylike"


def test_service_settings_read_their_prefixed_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONVEYOR_REGISTRYLIKE_LISTEN", "0.0.0.0:6000")
    monkeypatch.setenv("CONVEYOR_REGISTRYLIKE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CONVEYOR_REGISTRYLIKE_SHUTDOWN_GRACE", "PT3S")
    settings = RegistryLikeSettings()
    assert settings.listen == "0.0.0.0:6000"
    assert settings.service_data_dir == tmp_path / "registrylike"
    assert settings.shutdown_grace == timedelta(seconds=3)
    assert not settings.tls_enabled


@pytest.mark.parametrize("listen", ["6000", "host:", "host:99999", ":80"])
def test_bad_listen_address_is_refused(listen: str) -> None:
    with pytest.raises(ValidationError, match="HOST:PORT"):
        RegistryLikeSettings(listen=listen)


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValidationError):
        RegistryLikeSettings(listne="127.0.0.1:1")  # type: ignore[call-arg]


@pytest.mark.parametrize("cls", [ServiceSettings, TelemetrySettings, ClientSettings])
def test_every_setting_is_documented(cls: type) -> None:
    for name, field in cls.model_fields.items():
        assert field.description, f"{cls.__name__}.{name} has no docstring"


def test_peers_and_telemetry_come_from_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_POLICY_ADDR", "policy.internal:443")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert ClientSettings().address_of("policy") == "policy.internal:443"
    assert ClientSettings().address_of("registry") == "127.0.0.1:50051"
    assert TelemetrySettings().otlp_endpoint == "http://collector:4317"


def test_json_logs_carry_the_trace_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter("probe"))
    log = logging.getLogger("conveyor.test.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        with trace.get_tracer("test").start_as_current_span("work") as span:
            log.warning("model loaded", extra={"model": "models/x", "version": 3})
        log.warning("outside any span")
    finally:
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert (inside["message"], inside["model"], inside["version"]) == (
        "model loaded",
        "models/x",
        3,
    )
    assert (inside["service"], inside["level"]) == ("probe", "WARNING")
    assert outside["trace_id"] == ""


def test_traces_file_exporter_writes_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    provider = create_tracer_provider("probe", TelemetrySettings(CONVEYOR_TRACES_FILE=path))
    with provider.get_tracer("test").start_as_current_span("exported"):
        pass
    provider.shutdown()
    (line,) = path.read_text().splitlines()
    span = json.loads(line)
    assert span["name"] == "exported"
    assert span["resource"]["attributes"]["service.name"] == "conveyor-probe"


def test_sqlite_engine_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "nested" / "meta.db"))
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert isinstance(engine, sqlalchemy.engine.Engine)
    engine.dispose()


def test_sqlite_engine_memory_maps_only_when_asked(tmp_path: Path) -> None:
    plain = create_engine(sqlite_url(tmp_path / "plain.db"))
    mapped = create_engine(sqlite_url(tmp_path / "mapped.db"), sqlite_mmap_bytes=64 << 20)
    with plain.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA mmap_size").scalar() == 0
    with mapped.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA mmap_size").scalar() == 64 << 20
    plain.dispose()
    mapped.dispose()
