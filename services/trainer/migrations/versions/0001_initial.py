"""The trainer's first schema: uploaded datasets, training jobs, sweep jobs and
idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
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
        "datasets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dataset_id", sa.String(63), nullable=False, unique=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("upload", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_datasets_sha256", "datasets", ["sha256"])
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(63), nullable=False, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("dataset", sa.String(100), nullable=False),
        sa.Column("architecture", sa.String(32), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("sweep_job", sa.String(100), nullable=False),
        sa.Column("created_by", sa.String(300), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("update_time", timestamp, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_training_jobs_state", "training_jobs", ["state"])
    op.create_index("ix_training_jobs_dataset", "training_jobs", ["dataset"])
    op.create_table(
        "sweep_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sweep_id", sa.String(63), nullable=False, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(300), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("update_time", timestamp, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_sweep_jobs_state", "sweep_jobs", ["state"])
    op.create_table(
        "trainer_request_ids",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("resource_name", sa.String(200), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
    )


def downgrade() -> None:
    for table in ("trainer_request_ids", "sweep_jobs", "training_jobs", "datasets"):
        op.drop_table(table)
