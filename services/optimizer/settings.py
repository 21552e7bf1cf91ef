"""Settings of the optimizer (``CONVEYOR_OPTIMIZER_<FIELD>``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from conveyor.shared.ports import default_address
from conveyor.shared.settings import ServiceSettings


class OptimizerSettings(ServiceSettings):
    """Settings of the optimizer service."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_OPTIMIZER_")
    service_name: ClassVar[str] = "optimizer"

    database_url: str | None = None
    """SQLAlchemy URL of the jobs database. Unset: SQLite (WAL) at
    ``<data_dir>/optimizer/optimizer.db``. Migrations run at start-up."""

    max_running_jobs: int = Field(default=1, ge=0, le=64)
    """How many jobs run at once. Latency is measured while a job runs, so more
    than one at a time makes the numbers of each worse; 0 accepts and queues
    jobs without starting any (maintenance)."""

    max_queued_jobs: int = Field(default=100, ge=1, le=100_000)
    """How many jobs may wait; CreateOptimizationJob beyond it is RESOURCE_EXHAUSTED."""

    worker_threads: int = Field(default=8, ge=1, le=64)
    """Threads that run database work; also the database pool's size."""

    registry_addr: str = Field(
        default=default_address("registry"),
        validation_alias=AliasChoices("registry_addr", "CONVEYOR_REGISTRY_ADDR"),
    )
    """The registry (``CONVEYOR_REGISTRY_ADDR``): where sources are read and
    results registered."""

    artifact_signing_key: str = Field(
        default="artifact-signing", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
    )
    """The secret store's key that signs registry artifacts: a source whose
    signature does not verify with it is refused."""

    registration_attempts: int = Field(default=5, ge=1, le=100)
    """How often a registry call is tried (with backoff) while the registry is
    unavailable before the technique fails."""
