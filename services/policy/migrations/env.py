"""Alembic environment: migrations run on the connection the policy service passes
in (see ``conveyor.services.policy.migrate``), on SQLite or PostgreSQL."""

from __future__ import annotations

from conveyor.services.policy.audit_schema import metadata
from conveyor.shared.storage.migrations import run_migrations

run_migrations(metadata)
