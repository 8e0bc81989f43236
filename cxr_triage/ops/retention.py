"""Spool retention: the received files of finished instances are deleted ``[storage] spool_retention_days`` after
their outcome was recorded. The PACS keeps the original and the database keeps the results."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db

logger = logging.getLogger(log_name(__name__))

PURGE_BATCH = 500
"""Spool files deleted per transaction."""
PURGE_MAX_BATCHES = 10
"""Transactions per retention round: a large backlog is worked off over several rounds, between batches."""


def purge_spool(sessions: sessionmaker[Session], retention_days: float, now: dt.datetime | None = None) -> int:
    """Delete the spool files of instances finished more than ``retention_days`` ago; the number deleted.

    Only finished instances (classified, refused or failed) lose their file: one still queued or processing
    keeps it, whatever its age. Each file is unlinked, then its row gets ``spool_removed_at`` in the same
    transaction (a crash in between leaves a row whose file is already gone: the next round marks it). A file
    that cannot be deleted is logged and left for the next round. Rows are taken with SKIP LOCKED, so hosts
    sharing the spool do not collide. ``retention_days <= 0`` keeps every file.
    """
    if retention_days <= 0:
        return 0
    now = now or db.utcnow()
    cutoff = now - dt.timedelta(days=retention_days)
    removed = 0
    for _ in range(PURGE_MAX_BATCHES):
        with sessions() as session, session.begin():
            rows = session.scalars(
                select(db.Instance)
                .where(
                    db.Instance.spool_removed_at.is_(None),
                    db.Instance.completed_at < cutoff,
                    db.Instance.status.in_(db.TERMINAL_STATES),
                )
                .order_by(db.Instance.completed_at)
                .limit(PURGE_BATCH)
                .with_for_update(skip_locked=True)
            ).all()
            marked = 0
            for row in rows:
                try:
                    Path(row.spool_path).unlink(missing_ok=True)
                except OSError:
                    logger.exception("spool file %s could not be deleted; retrying next round", row.spool_path)
                    continue
                row.spool_removed_at = now
                marked += 1
        removed += marked
        if len(rows) < PURGE_BATCH or not marked:
            break
    if removed:
        logger.info("spool retention: deleted %d file(s) finished before %s", removed, cutoff.isoformat())
    return removed
