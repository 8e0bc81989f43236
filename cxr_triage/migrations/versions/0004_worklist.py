"""The worklist: study priorities, thumbnails, radiologist feedback, users, sessions and the audit trail.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMNs (no table copy: on SQLite a copy of ``studies`` would break the foreign keys to it)
    op.add_column("studies", sa.Column("accession_number", sa.String(length=64), nullable=True))
    op.add_column("studies", sa.Column("priority", sa.String(length=16), nullable=True))
    op.add_column("studies", sa.Column("priority_rule", sa.String(length=32), nullable=True))
    op.add_column("studies", sa.Column("priority_reason", sa.Text(), nullable=True))
    op.add_column("studies", sa.Column("priority_thresholds", sa.JSON(), nullable=True))
    op.add_column("studies", sa.Column("priority_model_version", sa.String(length=128), nullable=True))
    op.add_column("studies", sa.Column("priority_final", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("studies", sa.Column("priority_updated_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("instances", sa.Column("thumbnail_path", sa.String(length=1024), nullable=True))
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label_before", sa.String(length=32), nullable=True),
        sa.Column("label_after", sa.String(length=32), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_feedback_study_id", "feedback", ["study_id"], unique=False)
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
    )
    op.create_table(
        "web_sessions",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    op.create_index("ix_web_sessions_username", "web_sessions", ["username"], unique=False)
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("audit")
    op.drop_index("ix_web_sessions_username", table_name="web_sessions")
    op.drop_table("web_sessions")
    op.drop_table("users")
    op.drop_index("ix_feedback_study_id", table_name="feedback")
    op.drop_table("feedback")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("thumbnail_path")
    with op.batch_alter_table("studies") as batch:
        for column in ("priority_updated_at", "priority_final", "priority_model_version", "priority_thresholds",
                       "priority_reason", "priority_rule", "priority", "accession_number"):  # fmt: skip
            batch.drop_column(column)
