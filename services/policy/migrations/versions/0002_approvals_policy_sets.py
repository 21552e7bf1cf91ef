"""Approvals of model versions for aliases, and every policy set ever loaded.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "approvals",
        sa.Column("approval_id", sa.String(36), primary_key=True),
        sa.Column("model_id", sa.String(63), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("alias", sa.String(63), nullable=False),
        sa.Column("approver", sa.Text, nullable=False),
        sa.Column("approver_text", sa.String(300), nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("revoke_time", timestamp, nullable=True),
        sa.Column("revoker", sa.Text, nullable=True),
        sa.Column("revoke_reason", sa.Text, nullable=False),
        sa.Column("decision", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True, unique=True),
    )
    op.create_index("ix_approvals_version", "approvals", ["model_id", "version", "alias"])
    op.create_table(
        "policy_sets",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("load_time", timestamp, nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("files", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("policy_sets")
    op.drop_index("ix_approvals_version", "approvals")
    op.drop_table("approvals")
