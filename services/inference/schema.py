"""The inference service's table (SQLAlchemy Core), the same on SQLite and PostgreSQL.

A deployment keeps its whole ``Deployment`` message in ``body``; ``etag``
changes with every write, which is how each serving process notices a change
made through another one. Alembic migrations in ``migrations/`` create the
table; a test checks that the migrated database matches this module.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, LargeBinary, MetaData, String, Table

metadata = MetaData()

deployments = Table(
    "deployments",
    metadata,
    Column("deployment_id", String(63), primary_key=True),
    Column("etag", String(32), nullable=False),
    # AIP-155: a retried create with the same request id returns this deployment.
    Column("request_id", String(64), nullable=True, unique=True),
    Column("request_hash", String(64), nullable=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("body", LargeBinary, nullable=False),
)
