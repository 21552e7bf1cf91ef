"""Alembic environment: migrations run on the connection the optimizer passes in
(see ``conveyor.services.optimizer.migrate``), on SQLite or PostgreSQL."""

from __future__ import annotations

from conveyor.services.optimizer.schema import metadata
from conveyor.shared.storage.migrations import run_migrations

run_migrations(metadata)
