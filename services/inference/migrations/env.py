"""Alembic environment: migrations run on the connection the inference passes in
(see ``conveyor.services.inference.migrate``), on SQLite or PostgreSQL."""

from __future__ import annotations

from alembic import context

from conveyor.services.inference.schema import metadata

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
