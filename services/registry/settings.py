"""Settings of the registry (``CONVEYOR_REGISTRY_<FIELD>``)."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from conveyor.shared.settings import ServiceSettings

GIB = 1024**3


class RegistrySettings(ServiceSettings):
    """Settings of the registry service."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_REGISTRY_")
    service_name: ClassVar[str] = "registry"

    database_url: str | None = None
    """SQLAlchemy URL of the metadata database, e.g.
    ``postgresql+psycopg://registry@db:5432/registry``. Unset: SQLite (WAL) at
    ``<data_dir>/registry/registry.db``. Migrations run at start-up."""

    max_artifact_bytes: int = Field(default=64 * GIB, ge=1)
    """Largest artifact an upload may declare."""

    worker_threads: int = Field(default=8, ge=1, le=64)
    """Threads that run database and file work; also the database pool's size."""

    watch_poll_interval: timedelta = timedelta(seconds=1)
    """How often alias watchers look for changes made by other registry replicas
    (changes made by this process reach them at once)."""

    artifact_signing_key: str = Field(
        default="artifact-signing", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
    )
    """Name of the Ed25519 key in the secret store that signs every artifact's
    digest at registration (created at start-up if missing). Inference verifies
    with the same name in its own store, so both must point at one key."""

    encrypt_artifacts: bool = True
    """Encrypt every new artifact and attachment at rest (envelope encryption:
    AES-256-GCM in 1 MiB chunks under a fresh data key per blob, wrapped by
    ``artifact_encryption_key``). Blobs stored before, or with this off, stay
    readable either way: no migration in either direction. Reading encrypted
    blobs needs the secret store that wrote them, also with this off."""

    artifact_encryption_key: str = Field(
        default="artifact-encryption", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
    )
    """Name of the ``aes256-gcm96`` key in the secret store that wraps the data
    keys of new blobs (created at start-up if missing; a derived Transit key in
    Vault, with each blob's digest as the context). Each blob records the key
    name and version that wrapped it, so rotating the key, or renaming this
    setting, leaves older blobs readable while the old key exists."""

    promotion_gate: Literal["policy", "off"] = "policy"
    """``policy``: every alias move asks the policy service's ``EvaluatePromotion``
    (at ``CONVEYOR_POLICY_ADDR``) and is refused, listing the failed gates, unless
    allowed, or when policy cannot answer. ``off``: aliases move without gates (for
    tests and tools that exercise the registry alone; logged as a warning)."""
