"""Artifact signatures: each version row keeps the registry's signature over its
artifact's digest (algorithm, key id naming the key version, raw signature,
sign time).

The columns are nullable because versions registered before this revision have
no signature and cannot get one after the fact without vouching for bytes the
registry did not sign at registration: they stay unsigned and are reported so.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COLUMNS = ("signature_algorithm", "signature_key_id", "signature", "sign_time")


def upgrade() -> None:
    # Nullable columns without defaults: a plain ALTER TABLE ADD COLUMN on both
    # SQLite and PostgreSQL, with no table rewrite.
    op.add_column("model_versions", sa.Column("signature_algorithm", sa.String(32)))
    op.add_column("model_versions", sa.Column("signature_key_id", sa.String(200)))
    op.add_column("model_versions", sa.Column("signature", sa.LargeBinary))
    op.add_column("model_versions", sa.Column("sign_time", sa.DateTime(timezone=True)))


def downgrade() -> None:
    # Not batch mode: copying model_versions on SQLite would drop a table that
    # aliases and attachments reference. SQLite (3.35+) drops plain columns in place.
    for column in reversed(_COLUMNS):
        op.drop_column("model_versions", column)
