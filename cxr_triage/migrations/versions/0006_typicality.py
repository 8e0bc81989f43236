"""The typicality gate's score (how unlike the training chest radiographs an input is) on each result.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("typicality", sa.Float(), nullable=True))
    op.add_column("refusals", sa.Column("typicality", sa.Float(), nullable=True))


def downgrade() -> None:
    for table in ("refusals", "predictions"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("typicality")
