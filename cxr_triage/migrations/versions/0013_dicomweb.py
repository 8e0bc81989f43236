"""DICOMweb outbox (issue 32): ``dicomweb_stores``, one row per SR and ``[dicomweb] destinations`` entry, sent by
STOW-RS with the retries and dead letter of every outgoing row (``cxr_triage.outputs.delivery``).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dicomweb_stores",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sr_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=300), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["sr_id"], ["sr_documents.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dicomweb_stores_sr_id", "dicomweb_stores", ["sr_id"], unique=False)
    op.create_index("ix_dicomweb_stores_state_next", "dicomweb_stores", ["state", "next_attempt_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_dicomweb_stores_state_next", table_name="dicomweb_stores")
    op.drop_index("ix_dicomweb_stores_sr_id", table_name="dicomweb_stores")
    op.drop_table("dicomweb_stores")
