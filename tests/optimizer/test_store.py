"""The optimizer's database: the migrations build exactly the schema module's tables."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from conveyor.services.optimizer import schema
from conveyor.services.optimizer.migrate import VERSION_TABLE, upgrade_to_head
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url


def test_the_migrations_build_exactly_the_schema(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "optimizer.db"))
    upgrade_to_head(engine)
    upgrade_to_head(engine)  # a second run finds nothing to do
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        differences = compare_metadata(context, schema.metadata)
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert differences == []
    assert tables == set(schema.metadata.tables) | {VERSION_TABLE}
