"""FHIR R4 out (issue 32): the ``fhir_reports`` outbox, one row per finished study and ``[fhir]`` destination, with
the transaction Bundle it sends and the state of its retries (``cxr_triage.outputs.fhir``).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fhir_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=300), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bundle", sa.Text(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_fhir_reports_study_id", "fhir_reports", ["study_id"], unique=False)
    op.create_index("ix_fhir_reports_state_next", "fhir_reports", ["state", "next_attempt_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_fhir_reports_state_next", table_name="fhir_reports")
    op.drop_index("ix_fhir_reports_study_id", table_name="fhir_reports")
    op.drop_table("fhir_reports")
