"""The optimizer's first schema: optimisation jobs and idempotency keys.

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
        "optimization_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(63), nullable=False, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("update_time", timestamp, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_optimization_jobs_state", "optimization_jobs", ["state"])
    op.create_index("ix_optimization_jobs_source", "optimization_jobs", ["source"])
    op.create_table(
        "optimizer_request_ids",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("job_name", sa.String(200), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("optimizer_request_ids")
    op.drop_index("ix_optimization_jobs_source", "optimization_jobs")
    op.drop_index("ix_optimization_jobs_state", "optimization_jobs")
    op.drop_table("optimization_jobs")
