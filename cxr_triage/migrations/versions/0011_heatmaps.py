"""Heatmaps (issue 31): where the worker stored each classified instance's Grad-CAM map
(``instances.heatmap_path``, a ``cxr_triage.ml.heatmap.save_coarse`` file); null without one.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("heatmap_path", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("heatmap_path")
