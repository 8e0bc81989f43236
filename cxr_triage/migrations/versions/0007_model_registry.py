"""The model registry: each model version's state (candidate, champion, retired), lineage, training data, config,
and the champion before it (what ``models rollback`` returns to).

The ``active`` flag goes: the model that was active becomes the champion, every other one retired. A partial
unique index allows one champion at most, on SQLite and PostgreSQL alike.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ONE_CHAMPION = "state = 'champion'"


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("state", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("previous_champion_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("training_data", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("config", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("state_reason", sa.Text(), nullable=True))
        batch.create_foreign_key("fk_model_versions_parent_id", "model_versions", ["parent_id"], ["id"])
        batch.create_foreign_key(
            "fk_model_versions_previous_champion_id", "model_versions", ["previous_champion_id"], ["id"]
        )
    # One champion even if a database somehow had several active rows: the first one registered.
    op.execute(
        "UPDATE model_versions SET "
        "state = CASE WHEN id = (SELECT MIN(id) FROM model_versions WHERE active) THEN 'champion' ELSE 'retired' END, "
        "promoted_at = CASE WHEN id = (SELECT MIN(id) FROM model_versions WHERE active) THEN registered_at END, "
        "state_reason = CASE WHEN id = (SELECT MIN(id) FROM model_versions WHERE active) "
        "THEN 'the active model when the registry was introduced' "
        "ELSE 'registered before the registry was introduced, not active' END"
    )
    with op.batch_alter_table("model_versions") as batch:
        batch.alter_column("state", existing_type=sa.String(length=16), nullable=False)
        batch.drop_column("active")
    op.create_index(
        "uq_model_versions_one_champion",
        "model_versions",
        ["state"],
        unique=True,
        sqlite_where=sa.text(ONE_CHAMPION),
        postgresql_where=sa.text(ONE_CHAMPION),
    )


def downgrade() -> None:
    op.drop_index("uq_model_versions_one_champion", table_name="model_versions")
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("active", sa.Boolean(), nullable=True))
    op.execute("UPDATE model_versions SET active = (state = 'champion')")
    with op.batch_alter_table("model_versions") as batch:
        batch.alter_column("active", existing_type=sa.Boolean(), nullable=False)
        batch.drop_constraint("fk_model_versions_previous_champion_id", type_="foreignkey")
        batch.drop_constraint("fk_model_versions_parent_id", type_="foreignkey")
        for name in (
            "state_reason",
            "retired_at",
            "promoted_at",
            "config",
            "training_data",
            "previous_champion_id",
            "parent_id",
            "state",
        ):
            batch.drop_column(name)
