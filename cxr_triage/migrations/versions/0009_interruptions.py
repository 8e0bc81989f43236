"""How often the worker process holding a job died while processing it (``instances.interruptions``).

Such a job goes back to the queue with the attempt counted and is then processed alone, so that a file that
crashes its worker (a fault inside a C decoder, say) fails with the reason after ``[worker] max_attempts``
instead of taking the worker down again and again, and the files it shared a batch with are not blamed.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("interruptions", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("interruptions")
