"""The monitor's first schema: the prediction log, feedback, windows, references,
configs, stored reports, SLOs, alert rules, alerts and their events.

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
    op.create_table(
        "alert_events",
        sa.Column("sequence", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_type", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.String(length=63), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sequence"),
    )
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.create_index("alert_events_by_alert", ["alert_id", "sequence"], unique=False)
    op.create_table(
        "alert_rules",
        sa.Column("rule_id", sa.String(length=63), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("rule_id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_table(
        "alerts",
        sa.Column("alert_id", sa.String(length=63), nullable=False),
        sa.Column("rule_id", sa.String(length=63), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("open_time_us", sa.BigInteger(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("alert_id"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index("alerts_by_rule", ["rule_id", "model_version", "state"], unique=False)

    op.create_table(
        "canary_analyses",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )
    op.create_table(
        "feedback",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=256), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("time_us", sa.BigInteger(), nullable=False),
        sa.Column("ingest_time_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", "request_id"),
    )
    op.create_table(
        "monitoring_configs",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )
    op.create_table(
        "predictions",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=256), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("time_us", sa.BigInteger(), nullable=False),
        sa.Column("window_index", sa.BigInteger(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("latency_us", sa.BigInteger(), nullable=False),
        sa.Column("shadow", sa.Boolean(), nullable=False),
        sa.Column("numerical", sa.LargeBinary(), nullable=False),
        sa.Column("categorical", sa.Text(), nullable=False),
        sa.Column("outputs", sa.LargeBinary(), nullable=False),
        sa.Column("subject_hash", sa.String(length=64), nullable=True),
        sa.Column("outlier_score", sa.Float(), nullable=True),
        sa.Column("outlier", sa.Boolean(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("label_time_us", sa.BigInteger(), nullable=True),
        sa.Column("ingest_time_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model", "request_id", "model_version"),
    )
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.create_index("predictions_by_subject", ["subject_hash"], unique=False)
        batch_op.create_index("predictions_by_model_time", ["model", "time_us"], unique=False)
        batch_op.create_index("predictions_by_time", ["model_version", "time_us"], unique=False)
        batch_op.create_index(
            "predictions_by_window", ["model_version", "window_index"], unique=False
        )

    op.create_table(
        "reports",
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("window_index", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("model_version", "window_index", "kind"),
    )
    op.create_table(
        "rule_states",
        sa.Column("rule_id", sa.String(length=63), nullable=False),
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("rule_id", "model_version"),
    )
    op.create_table(
        "service_level_objectives",
        sa.Column("slo_id", sa.String(length=63), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("slo_id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_table(
        "version_references",
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("scorer", sa.LargeBinary(), nullable=True),
        sa.Column("scorer_method", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("model_version"),
    )
    op.create_table(
        "windows",
        sa.Column("model_version", sa.String(length=200), nullable=False),
        sa.Column("window_index", sa.BigInteger(), nullable=False),
        sa.Column("start_us", sa.BigInteger(), nullable=False),
        sa.Column("end_us", sa.BigInteger(), nullable=False),
        sa.Column("deadline_us", sa.BigInteger(), nullable=True),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
        sa.Column("error_count", sa.BigInteger(), nullable=False),
        sa.Column("outlier_count", sa.BigInteger(), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False),
        sa.Column("close_time_us", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("model_version", "window_index"),
    )


def downgrade() -> None:
    op.drop_table("windows")
    op.drop_table("version_references")
    op.drop_table("service_level_objectives")
    op.drop_table("rule_states")
    op.drop_table("reports")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index("predictions_by_window")
        batch_op.drop_index("predictions_by_time")
        batch_op.drop_index("predictions_by_subject")
        batch_op.drop_index("predictions_by_model_time")

    op.drop_table("predictions")
    op.drop_table("monitoring_configs")
    op.drop_table("feedback")
    op.drop_table("canary_analyses")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("alerts_by_rule")

    op.drop_table("alerts")
    op.drop_table("alert_rules")
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.drop_index("alert_events_by_alert")
    op.drop_table("alert_events")
