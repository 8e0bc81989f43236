"""The model registry: one ``model_versions`` row per classifier file (by sha256) that a worker has loaded.

Workers register the model they load at start-up; several workers (processes or hosts sharing PostgreSQL) start
together and load the same file, so registration is one ``INSERT ... ON CONFLICT (sha256) DO NOTHING``: whoever
comes second inserts nothing and fails nothing. The first model ever registered is marked active.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import exists, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import db

if TYPE_CHECKING:
    from cxr_triage.checkpoint import LoadedModel

logger = logging.getLogger(__name__)


def _insert_ignoring_duplicates(session: Session, values: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    table = db.ModelVersion.__table__
    if dialect == "postgresql":
        session.execute(postgresql.insert(table).values(values).on_conflict_do_nothing(index_elements=["sha256"]))
    elif dialect == "sqlite":
        session.execute(sqlite.insert(table).values(values).on_conflict_do_nothing(index_elements=["sha256"]))
    else:  # other backends: a savepoint, so that a duplicate leaves the transaction usable
        try:
            with session.begin_nested():
                session.execute(insert(table).values(values))
        except IntegrityError:
            pass


def register_model(sessions: sessionmaker[Session], loaded: LoadedModel) -> int:
    """The id of ``loaded``'s row in ``model_versions``, inserting it if no worker has yet."""
    values = {
        "version": loaded.card.model_version,
        "sha256": loaded.sha256,
        "path": str(loaded.path),
        "registered_at": db.utcnow(),
        "metrics": dict(loaded.card.provenance.get("metrics") or {}) or None,
        "active": False,
    }
    table = db.ModelVersion
    with sessions() as session, session.begin():
        _insert_ignoring_duplicates(session, values)
        other_active = exists().where(table.active.is_(True))
        session.execute(update(table).where(table.sha256 == loaded.sha256, ~other_active).values(active=True))
        row_id = session.scalar(select(table.id).where(table.sha256 == loaded.sha256))
    assert row_id is not None
    return row_id
