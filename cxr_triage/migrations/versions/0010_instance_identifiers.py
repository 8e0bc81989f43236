"""The patient and order identifiers of each instance, read from its header when it is processed
(``instances.identifiers``).

The HL7 result of a study is built from them, not from the spool file, which retention may have deleted by the
time the study is aggregated again. Instances processed before this revision have none: a study made only of
them gets its HL7 row dead with the reason (``cxr-triage forward`` lists it).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("identifiers", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("identifiers")
