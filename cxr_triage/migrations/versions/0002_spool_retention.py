"""Spool retention: when the received file of a finished instance was deleted.

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
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("spool_removed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_instances_spool_purge", ["spool_removed_at", "completed_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_index("ix_instances_spool_purge")
        batch.drop_column("spool_removed_at")
