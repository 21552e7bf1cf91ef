"""Alembic environment: migrations run on the connection the inference passes in
(see ``conveyor.services.inference.migrate``), on SQLite or PostgreSQL."""

from __future__ import annotations

from conveyor.services.inference.schema import metadata
from conveyor.shared.storage.migrations import run_migrations

run_migrations(metadata)
