"""Alembic migrations run by the services themselves at start-up."""

from __future__ import annotations

from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData
from sqlalchemy.engine import Engine


def alembic_config(script_location: Path, version_table: str = "alembic_version") -> Config:
    """An Alembic configuration for one service's migrations directory.

    Each service keeps its own ``version_table`` so that services sharing one
    database keep separate migration histories.
    """
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("version_table", version_table)
    return config


def upgrade_to_head(engine: Engine, config: Config) -> None:
    """Apply every migration the database lacks (none on an up-to-date one)."""
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def run_migrations(metadata: MetaData) -> None:
    """The body of every service's Alembic ``env.py``: run the migrations on
    the connection :func:`upgrade_to_head` passed in, in the service's own
    version table, on SQLite or PostgreSQL."""
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=context.config.get_main_option("version_table") or "alembic_version",
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
