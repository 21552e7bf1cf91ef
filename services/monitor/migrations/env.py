"""Alembic environment: migrations run on the connection the monitor passes in
(see ``conveyor.services.monitor.migrate``), on SQLite or PostgreSQL."""

from __future__ import annotations

from conveyor.services.monitor.schema import metadata
from conveyor.shared.storage.migrations import run_migrations

run_migrations(metadata)
