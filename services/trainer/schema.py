"""The trainer's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Each resource keeps its whole protobuf message in ``body`` beside the columns
that queries, constraints and ordering need (kept in step with the body on
every write). Alembic migrations in ``migrations/`` create these tables; a test
checks that the migrated database matches this module. Table names that could
meet another service's in a shared database carry the ``trainer_`` prefix.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

datasets = Table(
    "datasets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dataset_id", String(63), nullable=False, unique=True),
    # The uploaded file in the blob store (SHA-256, lowercase hex).
    Column("sha256", String(64), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    # The Dataset resource, and the metadata it was uploaded with (what parses
    # the file again: format, label column, class names as the client gave them).
    Column("body", LargeBinary, nullable=False),
    Column("upload", LargeBinary, nullable=False),
)

training_jobs = Table(
    "training_jobs",
    metadata,
    # Increasing with creation: the queue's order.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(63), nullable=False, unique=True),
    Column("state", String(16), nullable=False, index=True),
    Column("dataset", String(100), nullable=False, index=True),
    Column("architecture", String(32), nullable=False),
    Column("model", String(100), nullable=False),
    Column("sweep_job", String(100), nullable=False),
    Column("created_by", String(300), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("body", LargeBinary, nullable=False),
)

sweep_jobs = Table(
    "sweep_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sweep_id", String(63), nullable=False, unique=True),
    Column("state", String(16), nullable=False, index=True),
    Column("created_by", String(300), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("body", LargeBinary, nullable=False),
)

request_ids = Table(
    "trainer_request_ids",
    metadata,
    # AIP-155: a retried create with the same request id returns this resource.
    Column("request_id", String(64), primary_key=True),
    Column("method", String(64), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("resource_name", String(200), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)
