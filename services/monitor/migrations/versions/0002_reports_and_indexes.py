"""Stored reports remember the settings they were computed under (so that a
closed window's drift report can be served back while they are current);
closed windows' features packed as columns (``packed_windows``); alert events
remember when they were recorded (their retention); and the
prediction log keeps fewer index entries per row (ingest cost): the subject
index holds only rows with a subject, and time ranges of a version use the
model's time index.

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

_HAS_SUBJECT = sa.text("subject_hash IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("settings_time_us", sa.BigInteger(), nullable=True))
    op.create_table(
        "packed_windows",
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("window_index", sa.BigInteger(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
        sa.Column("columns", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("model_version", "window_index", "part", "chunk"),
    )
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("time_us", sa.BigInteger(), nullable=True))
    op.drop_index("predictions_by_time", table_name="predictions")
    op.drop_index("predictions_by_subject", table_name="predictions")
    op.create_index(
        "predictions_by_subject",
        "predictions",
        ["subject_hash"],
        sqlite_where=_HAS_SUBJECT,
        postgresql_where=_HAS_SUBJECT,
    )


def downgrade() -> None:
    op.drop_index("predictions_by_subject", table_name="predictions")
    op.create_index("predictions_by_subject", "predictions", ["subject_hash"])
    op.create_index("predictions_by_time", "predictions", ["model_version", "time_us"])
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.drop_column("time_us")
    op.drop_table("packed_windows")
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_column("settings_time_us")
