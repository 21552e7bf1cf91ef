"""The optimizer's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

A job keeps its whole ``OptimizationJob`` message in ``body`` beside the
columns that queries, constraints and ordering need (kept in step with the
body on every write). Alembic migrations in ``migrations/`` create these
tables; a test checks that the migrated database matches this module.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Integer, LargeBinary, MetaData, String, Table

metadata = MetaData()

optimization_jobs = Table(
    "optimization_jobs",
    metadata,
    # Increasing with creation: the queue's order.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(63), nullable=False, unique=True),
    Column("state", String(16), nullable=False, index=True),
    Column("source", String(200), nullable=False, index=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("body", LargeBinary, nullable=False),
)

request_ids = Table(
    "optimizer_request_ids",
    metadata,
    # AIP-155: a retried create with the same request id returns this job.
    Column("request_id", String(64), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("job_name", String(200), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)
