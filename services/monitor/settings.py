"""Settings of the monitor service (``CONVEYOR_MONITOR_<FIELD>``)."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from conveyor.shared.ports import default_address
from conveyor.shared.settings import ServiceSettings

DEFAULT_METRICS_LISTEN = "127.0.0.1:9105"


class MonitorSettings(ServiceSettings):
    """Settings of the monitor service."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_MONITOR_")
    service_name: ClassVar[str] = "monitor"

    database_url: str | None = None
    """SQLAlchemy URL of the prediction log and monitoring database, e.g.
    ``postgresql+psycopg://monitor@db:5432/monitor``. Unset: SQLite (WAL) at
    ``<data_dir>/monitor/monitor.db``. Migrations run at start-up."""

    registry_addr: str = Field(
        default=default_address("registry"),
        validation_alias=AliasChoices("registry_addr", "CONVEYOR_REGISTRY_ADDR"),
    )
    """The registry (``CONVEYOR_REGISTRY_ADDR``): versions, their signatures,
    reference statistics and test metrics; rollbacks move its aliases."""

    trainer_addr: str = Field(
        default=default_address("trainer"),
        validation_alias=AliasChoices("trainer_addr", "CONVEYOR_TRAINER_ADDR"),
    )
    """The trainer (``CONVEYOR_TRAINER_ADDR``), which retraining actions call."""

    subject_key_secret: str = Field(
        default="monitor/subject-key", pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$"
    )
    """The secret store's KV path whose ``key`` keys the hash of subject keys
    and hashed personal features (created on first start)."""

    ingest_capacity: int = Field(default=200_000, ge=1_000, le=100_000_000)
    """Prediction records being validated and stored at once, over every
    caller; a call that would exceed it gets RESOURCE_EXHAUSTED at once, so
    memory stays bounded and callers back off instead of queueing."""

    max_violations: int = Field(default=20, ge=1, le=1_000)
    """Field violations named in one INVALID_ARGUMENT answer (the rest are counted)."""

    evaluation_interval: timedelta = timedelta(seconds=5)
    """How often time windows whose end has passed are closed, SLOs are
    evaluated and canary analyses refreshed."""

    purge_interval: timedelta = timedelta(hours=1)
    """How often rows older than each model's retention are deleted."""

    alert_event_retention: timedelta = timedelta(days=30)
    """How long alert events are kept for ``WatchAlerts`` to replay; a watch
    resuming from a purged event gets FAILED_PRECONDITION (watch again from
    0). An open alert's latest event and everything after it is kept."""

    worker_threads: int = Field(default=4, ge=1, le=64)
    """Threads running database work and statistics; also the database pool's size."""

    metrics_listen: str = DEFAULT_METRICS_LISTEN
    """``host:port`` of the Prometheus ``/metrics`` endpoint; empty: none."""

    @field_validator("alert_event_retention")
    @classmethod
    def _check_alert_event_retention(cls, value: timedelta) -> timedelta:
        if value < timedelta(hours=1):
            raise ValueError("alert_event_retention must be at least one hour")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, value: str) -> str:
        if value and (":" not in value or not value.rsplit(":", 1)[1].isdigit()):
            raise ValueError("metrics_listen must be HOST:PORT or empty")
        return value
