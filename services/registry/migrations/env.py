"""Alembic environment: migrations run on the connection the registry passes in
(see ``conveyor.services.registry.migrate``), on SQLite or PostgreSQL."""

from __future__ import annotations

from conveyor.services.registry.schema import metadata
from conveyor.shared.storage.migrations import run_migrations

run_migrations(metadata)
