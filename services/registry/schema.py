"""The registry's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Each resource keeps its protobuf message in ``body`` (the fields it owns) beside
the columns that queries, constraints and ordering need. Alembic migrations in
``migrations/`` create and evolve these tables; a test checks that the migrated
database matches this module.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", String(63), nullable=False, unique=True),
    Column("state", String(16), nullable=False),
    # The number the next version gets; incremented in the version's own
    # transaction, so numbers have no gaps and no duplicates.
    Column("next_version", Integer, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("etag", String(32), nullable=False),
    Column("body", LargeBinary, nullable=False),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_pk", Integer, ForeignKey("models.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("parent_version", String(160), nullable=False, index=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("etag", String(32), nullable=False),
    Column("body", LargeBinary, nullable=False),
    # The registry's signature over the artifact's raw SHA-256 digest, made
    # before the row is inserted (migration 0003). NULL only on versions
    # registered before signing existed: they are reported unsigned.
    Column("signature_algorithm", String(32), nullable=True),
    Column("signature_key_id", String(200), nullable=True),
    Column("signature", LargeBinary, nullable=True),
    Column("sign_time", DateTime(timezone=True), nullable=True),
    UniqueConstraint("model_pk", "version", name="uq_model_versions_model_version"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("model_pk", Integer, ForeignKey("models.id"), primary_key=True),
    Column("alias_id", String(63), primary_key=True),
    Column("version_pk", Integer, ForeignKey("model_versions.id"), nullable=False, index=True),
    Column("revision", BigInteger, nullable=False),
    Column("body", LargeBinary, nullable=False),
)

alias_events = Table(
    "alias_events",
    metadata,
    # The registry-wide alias revision; assigned under the counter's row lock,
    # so revisions commit in order and a watch can resume from one.
    Column("revision", BigInteger, primary_key=True, autoincrement=False),
    Column("model_id", String(63), nullable=False, index=True),
    Column("alias_id", String(63), nullable=False),
    Column("event_type", String(16), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("body", LargeBinary, nullable=False),
)

counters = Table(
    "counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

attachments = Table(
    "attachments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version_pk", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("attachment_id", String(63), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("body", LargeBinary, nullable=False),
    UniqueConstraint("version_pk", "attachment_id", name="uq_attachments_version_attachment"),
)

request_ids = Table(
    "request_ids",
    metadata,
    # AIP-155: a retried create with the same request id returns this resource.
    Column("request_id", String(64), primary_key=True),
    Column("method", String(64), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("resource_name", String(200), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

ALIAS_REVISION_COUNTER = "alias_revision"
