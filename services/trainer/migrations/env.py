"""Alembic environment: migrations run on the connection the trainer passes in
(see ``conveyor.services.trainer.migrate``), on SQLite or PostgreSQL."""

from __future__ import annotations

from conveyor.services.trainer.schema import metadata
from conveyor.shared.storage.migrations import run_migrations

run_migrations(metadata)
