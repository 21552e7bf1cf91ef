"""The registry's first schema: models, versions, aliases and their events,
attachments, counters and idempotency keys.

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
        "models",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.String(63), nullable=False, unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("next_version", sa.Integer, nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("update_time", timestamp, nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_pk", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("parent_version", sa.String(160), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("update_time", timestamp, nullable=False),
        sa.Column("etag", sa.String(32), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("model_pk", "version", name="uq_model_versions_model_version"),
    )
    op.create_index("ix_model_versions_sha256", "model_versions", ["sha256"])
    op.create_index("ix_model_versions_parent_version", "model_versions", ["parent_version"])
    op.create_table(
        "aliases",
        sa.Column("model_pk", sa.Integer, sa.ForeignKey("models.id"), primary_key=True),
        sa.Column("alias_id", sa.String(63), primary_key=True),
        sa.Column("version_pk", sa.Integer, sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_aliases_version_pk", "aliases", ["version_pk"])
    op.create_table(
        "alias_events",
        sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("model_id", sa.String(63), nullable=False),
        sa.Column("alias_id", sa.String(63), nullable=False),
        sa.Column("event_type", sa.String(16), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_alias_events_model_id", "alias_events", ["model_id"])
    op.create_table(
        "counters",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "attachments",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("version_pk", sa.Integer, sa.ForeignKey("model_versions.id"), nullable=False),
        sa.Column("attachment_id", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint(
            "version_pk", "attachment_id", name="uq_attachments_version_attachment"
        ),
    )
    op.create_index("ix_attachments_sha256", "attachments", ["sha256"])
    op.create_table(
        "request_ids",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("resource_name", sa.String(200), nullable=False),
        sa.Column("create_time", timestamp, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "request_ids",
        "attachments",
        "counters",
        "alias_events",
        "aliases",
        "model_versions",
        "models",
    ):
        op.drop_table(table)
