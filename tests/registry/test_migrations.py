"""The Alembic migrations build exactly the schema the code expects."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from conveyor.services.registry import schema
from conveyor.services.registry.migrate import upgrade_to_head
from conveyor.services.registry.settings import RegistrySettings
from conveyor.shared.storage import create_engine
from conveyor.shared.storage.database import sqlite_url


def test_migrated_database_matches_the_schema(registry_settings: RegistrySettings) -> None:
    url = registry_settings.database_url or sqlite_url(registry_settings.data_dir / "m.db")
    engine = create_engine(url)
    upgrade_to_head(engine)
    upgrade_to_head(engine)  # a second run finds nothing to do
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), schema.metadata)
        assert differences == []
        tables = set(inspect(connection).get_table_names())
    assert tables == set(schema.metadata.tables) | {"alembic_version"}
    engine.dispose()
