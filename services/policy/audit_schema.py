"""The audit log's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

``audit_entries`` holds one row per decision: ``body`` is the entry's canonical
JSON document (RFC 8785), the source of truth that ``entry_hash`` covers; the
other columns copy fields of it for filtering and ordering, and verification
checks that they still agree with the body. ``audit_head`` is a single row (id 1)
naming the newest entry: appends lock it, so they run one at a time and sequence
numbers have no gaps. ``audit_signatures`` keeps the chain-head signatures.
The migration in ``migrations/`` creates these tables.
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
    Text,
)

metadata = MetaData()

HEAD_ROW_ID = 1
GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first entry."""

audit_entries = Table(
    "audit_entries",
    metadata,
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("decision_id", String(36), nullable=False, unique=True),
    Column("create_time", DateTime(timezone=True), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("principal_id", String(256), nullable=False, index=True),
    Column("action", String(256), nullable=False),
    Column("resource_name", String(512), nullable=False, index=True),
    Column("outcome", String(16), nullable=False),
    Column("trace_id", String(32), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
    Column("body", Text, nullable=False),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("sequence", BigInteger, nullable=False),
    Column("entry_hash", String(64), nullable=False),
)

audit_signatures = Table(
    "audit_signatures",
    metadata,
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("entry_hash", String(64), nullable=False),
    Column("algorithm", String(32), nullable=False),
    Column("key_id", String(256), nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("sign_time", DateTime(timezone=True), nullable=False),
)
