"""Brings a monitor database to the newest schema with Alembic, recording
its migrations in its own version table (``monitor_alembic_version``)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy.engine import Engine

from conveyor.shared.storage import migrations

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "monitor_alembic_version"


def alembic_config() -> Config:
    return migrations.alembic_config(MIGRATIONS, VERSION_TABLE)


def upgrade_to_head(engine: Engine) -> None:
    """Apply every migration the database lacks (none on an up-to-date one)."""
    migrations.upgrade_to_head(engine, alembic_config())
