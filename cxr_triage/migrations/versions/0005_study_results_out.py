"""Study results out: HL7 ORU^R01 messages to the RIS and priority metadata for Orthanc, each with its retries.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _delivery_columns() -> list[sa.Column]:
    """The columns both tables share (``cxr_triage.core.db._StudyDelivery``)."""
    return [
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=300), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "hl7_messages",
        *_delivery_columns(),
        sa.Column("control_id", sa.String(length=20), nullable=False),
        sa.Column("result_status", sa.String(length=1), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("ack_code", sa.String(length=2), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("control_id"),
    )
    op.create_index("ix_hl7_messages_study_id", "hl7_messages", ["study_id"], unique=False)
    op.create_index("ix_hl7_messages_state_next", "hl7_messages", ["state", "next_attempt_at"], unique=False)
    op.create_table(
        "orthanc_metadata",
        *_delivery_columns(),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_orthanc_metadata_study_id", "orthanc_metadata", ["study_id"], unique=False)
    op.create_index("ix_orthanc_metadata_state_next", "orthanc_metadata", ["state", "next_attempt_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_orthanc_metadata_state_next", table_name="orthanc_metadata")
    op.drop_index("ix_orthanc_metadata_study_id", table_name="orthanc_metadata")
    op.drop_table("orthanc_metadata")
    op.drop_index("ix_hl7_messages_state_next", table_name="hl7_messages")
    op.drop_index("ix_hl7_messages_study_id", table_name="hl7_messages")
    op.drop_table("hl7_messages")
