"""Settings of the policy service (``CONVEYOR_POLICY_<FIELD>``)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from conveyor.shared.ports import default_address
from conveyor.shared.settings import ServiceSettings


class PolicySettings(ServiceSettings):
    """Settings of the policy service."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_POLICY_")
    service_name: ClassVar[str] = "policy"

    database_url: str | None = None
    """SQLAlchemy URL of the audit log and approvals database, e.g.
    ``postgresql+psycopg://policy@db:5432/policy``. Unset: SQLite (WAL) at
    ``<data_dir>/policy/policy.db``. Migrations run at start-up."""

    policy_dir: Path | None = None
    """Directory of the Cedar policy set (``*.cedar`` and ``schema.cedarschema``).
    Unset: the set shipped with Conveyor (the repository's ``policies/``)."""

    registry_addr: str = Field(
        default=default_address("registry"),
        validation_alias=AliasChoices("registry_addr", "CONVEYOR_REGISTRY_ADDR"),
    )
    """The registry (``CONVEYOR_REGISTRY_ADDR``), read for promotion facts."""

    audit_signing_key: str = "audit-signing"
    """The secret store's signing key that signs the audit chain's head."""

    artifact_signing_key: str = "artifact-signing"
    """The signing key the registry signs artifact digests with (the artifact
    signature gate verifies against it); must match the registry's setting."""

    head_sign_interval: timedelta = timedelta(seconds=10)
    """How often the chain head is signed when new entries arrived (and once more
    when the service drains)."""

    decision_cache_ttl: timedelta = timedelta(seconds=5)
    """How long callers may reuse an ``Authorize`` answer (its ``cache_ttl``); zero
    turns caching off, so a policy change applies to the very next call."""

    worker_threads: int = Field(default=8, ge=1, le=64)
    """Threads that run database work and policy evaluation; also the database
    pool's size."""
