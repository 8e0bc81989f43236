"""Heatmaps (issue 31): where the worker stored each classified instance's Grad-CAM map
(``instances.heatmap_path``, a ``cxr_triage.ml.heatmap.save_coarse`` file); null without one. The heatmap object
filed in the PACS with an SR (``cxr_triage.outputs.heatmapobject``): ``sr_documents.heatmap_sop_instance_uid``,
``heatmap_series_instance_uid`` and ``heatmap_path`` (beside the SR's file); null without one.

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
    with op.batch_alter_table("sr_documents") as batch:
        batch.add_column(sa.Column("heatmap_sop_instance_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("heatmap_series_instance_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("heatmap_path", sa.String(length=1024), nullable=True))
        batch.create_unique_constraint("uq_sr_documents_heatmap_sop_instance_uid", ["heatmap_sop_instance_uid"])


def downgrade() -> None:
    with op.batch_alter_table("sr_documents") as batch:
        batch.drop_constraint("uq_sr_documents_heatmap_sop_instance_uid", type_="unique")
        batch.drop_column("heatmap_path")
        batch.drop_column("heatmap_series_instance_uid")
        batch.drop_column("heatmap_sop_instance_uid")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("heatmap_path")
