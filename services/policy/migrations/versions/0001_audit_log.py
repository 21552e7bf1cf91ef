"""The policy service's first schema: the hash-chained audit log, its head and
its chain-head signatures.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "audit_entries",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("decision_id", sa.String(36), nullable=False, unique=True),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("principal_id", sa.String(256), nullable=False),
        sa.Column("action", sa.String(256), nullable=False),
        sa.Column("resource_name", sa.String(512), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_entries_create_time", "audit_entries", ["create_time"])
    op.create_index("ix_audit_entries_principal_id", "audit_entries", ["principal_id"])
    op.create_index("ix_audit_entries_resource_name", "audit_entries", ["resource_name"])
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
    )
    # The single head row exists from the start: the first append locks and
    # updates it like every other, instead of racing to insert it.
    op.bulk_insert(head, [{"id": 1, "sequence": 0, "entry_hash": "0" * 64}])
    op.create_table(
        "audit_signatures",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(256), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("sign_time", timestamp, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_signatures")
    op.drop_table("audit_head")
    op.drop_index("ix_audit_entries_resource_name", "audit_entries")
    op.drop_index("ix_audit_entries_principal_id", "audit_entries")
    op.drop_index("ix_audit_entries_create_time", "audit_entries")
    op.drop_table("audit_entries")
