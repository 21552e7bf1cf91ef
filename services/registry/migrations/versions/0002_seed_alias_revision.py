"""Seed the alias revision counter, so that concurrent first alias changes
update one existing row instead of racing to insert it.

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

_counters = sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger))


def upgrade() -> None:
    connection = op.get_bind()
    present = connection.execute(
        sa.select(_counters.c.name).where(_counters.c.name == "alias_revision")
    ).first()
    if present is None:
        # Existing events already used revisions up to their maximum.
        highest = connection.execute(sa.text("SELECT MAX(revision) FROM alias_events")).scalar()
        op.bulk_insert(_counters, [{"name": "alias_revision", "value": highest or 0}])


def downgrade() -> None:
    op.execute(_counters.delete().where(_counters.c.name == "alias_revision"))
