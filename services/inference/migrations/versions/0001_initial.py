"""The inference service's first schema: deployments.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
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
        "deployments",
        sa.Column("deployment_id", sa.String(63), primary_key=True),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True, unique=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("update_time", timestamp, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deployments")
