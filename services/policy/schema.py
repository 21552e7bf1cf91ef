"""The policy service's other tables (SQLAlchemy Core): approvals and the policy
sets it has loaded. The audit log's tables are in ``audit_schema``; the
migrations in ``migrations/`` create both."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, Integer, String, Table, Text

from conveyor.services.policy.audit_schema import metadata

approvals = Table(
    "approvals",
    metadata,
    Column("approval_id", String(36), primary_key=True),
    Column("model_id", String(63), nullable=False),
    Column("version", Integer, nullable=False),
    Column("alias", String(63), nullable=False),
    Column("approver", Text, nullable=False),  # the Principal as JSON
    Column("approver_text", String(300), nullable=False),  # `user:bob`, for filters
    Column("comment", Text, nullable=False),
    Column("state", String(32), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("revoke_time", DateTime(timezone=True), nullable=True),
    Column("revoker", Text, nullable=True),
    Column("revoke_reason", Text, nullable=False),
    Column("decision", String(64), nullable=False),
    Column("request_id", String(64), nullable=True, unique=True),
    Index("ix_approvals_version", "model_id", "version", "alias"),
)

policy_sets = Table(
    "policy_sets",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("load_time", DateTime(timezone=True), nullable=False),
    Column("version", String(128), nullable=False),
    Column("files", Text, nullable=False),  # [{path, sha256, content}] as JSON
)
