"""Brings a registry database to the newest schema with Alembic."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from sqlalchemy.engine import Engine

from conveyor.shared.storage import migrations

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config() -> Config:
    return migrations.alembic_config(MIGRATIONS)


def upgrade_to_head(engine: Engine) -> None:
    """Apply every migration the database lacks (none on an up-to-date one)."""
    migrations.upgrade_to_head(engine, alembic_config())
