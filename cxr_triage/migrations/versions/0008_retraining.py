"""Scheduled retraining: the runs of the retraining job, and named leases (a lock that ends when its holder dies).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=True),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "retrain_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("step", sa.String(length=300), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("feedback_after_id", sa.Integer(), nullable=True),
        sa.Column("feedback_to_id", sa.Integer(), nullable=True),
        sa.Column("new_studies", sa.Integer(), nullable=True),
        sa.Column("new_images", sa.Integer(), nullable=True),
        sa.Column("replay_images", sa.Integer(), nullable=True),
        sa.Column("eval_images", sa.Integer(), nullable=True),
        sa.Column("champion_id", sa.Integer(), nullable=True),
        sa.Column("candidate_id", sa.Integer(), nullable=True),
        sa.Column("champion_metrics", sa.JSON(), nullable=True),
        sa.Column("challenger_metrics", sa.JSON(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["candidate_id"], ["model_versions.id"]),
        sa.ForeignKeyConstraint(["champion_id"], ["model_versions.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_retrain_runs_state", "retrain_runs", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_retrain_runs_state", table_name="retrain_runs")
    op.drop_table("retrain_runs")
    op.drop_table("leases")
