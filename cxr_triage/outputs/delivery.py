"""The life of an outgoing row (an SR forward, an HL7 message, an Orthanc metadata update, a FHIR report): pending
-> sent | dead.

Every kind is sent by the housekeeping the same way: ``claim_due`` takes the due pending rows (SKIP LOCKED) and
leases them by pushing their ``next_attempt_at`` past the time a send may take, so two processes never send the
same row at once and a process killed mid-send leaves the row pending, to be retried when the lease passes. Each
attempt is counted by ``count_attempt``: success -> ``sent``; failure -> retried after
``retry_delay(attempt, backoff_seconds, backoff_max_seconds)``, and after ``max_attempts`` attempts the row goes
to the dead-letter state ``dead`` with its last error. ``requeue_dead`` (``cxr-triage forward --retry``) puts dead
rows back to pending with a fresh attempt budget.

Every row is made by ``new_row`` (pending and due now, or dead with why when its payload could not be built), in
the transaction of what it reports on. A study's HL7 message, Orthanc update or FHIR report that a newer one
replaces before it was sent is ``superseded`` (``supersede``): it is never sent, so a stale result cannot arrive
after the corrected one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core import db

Outgoing: TypeAlias = db.Forward | db.HL7Message | db.OrthancMetadata | db.FHIRReport | db.DicomwebStore
"""A row that is sent with retries."""
_Row = TypeVar("_Row", db.Forward, db.HL7Message, db.OrthancMetadata, db.FHIRReport, db.DicomwebStore)
StudyOutgoing: TypeAlias = type[db.HL7Message] | type[db.OrthancMetadata] | type[db.FHIRReport]
"""A kind of row that carries a study's result to one destination."""


def retry_delay(attempt: int, base: float, maximum: float) -> float:
    """Delay before retry number ``attempt`` (1 for the first retry): ``base * 2**(attempt - 1)``, capped at maximum."""
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an integer >= 1, got {attempt!r}")
    if base < 0 or maximum < 0:
        raise ValueError(f"base and maximum must not be negative, got {base!r} and {maximum!r}")
    # The exponent is bounded so that huge attempt numbers cannot overflow a float.
    return float(min(maximum, base * 2.0 ** min(attempt - 1, 1000)))


class RetryPolicy(Protocol):
    """The retry settings of one kind of row (``[forward]``, ``[hl7]``)."""

    @property
    def max_attempts(self) -> int: ...
    @property
    def backoff_seconds(self) -> float: ...
    @property
    def backoff_max_seconds(self) -> float: ...


def new_row(model: type[_Row], now: dt.datetime, dead_because: str | None = None, **columns: Any) -> _Row:
    """A new outgoing row of ``model`` with ``columns`` (what it carries, where to): pending and due at ``now``, or,
    with ``dead_because``, dead from the start (its payload could not be built) with that as its last error."""
    return model(
        **columns,
        attempts=0,
        state=db.FORWARD_DEAD if dead_because else db.FORWARD_PENDING,
        next_attempt_at=None if dead_because else now,
        last_error=dead_because,
        created_at=now,
        updated_at=now,
    )


def claim_due(
    sessions: sessionmaker[Session],
    model: type[Outgoing],
    now: dt.datetime,
    lease: dt.timedelta,
    force: bool = False,
    limit: int = 100,
    exclude: Collection[int] = (),
) -> list[int]:
    """Lease up to ``limit`` pending rows of ``model`` that are due (every pending one when ``force``), except the
    ids in ``exclude`` (those a command already tried): their ids, oldest due first."""
    with sessions() as session, session.begin():
        query = select(model.id).where(model.state == db.FORWARD_PENDING)
        if not force:
            query = query.where(model.next_attempt_at <= now)
        if exclude:
            query = query.where(model.id.not_in(list(exclude)))
        ids = list(
            session.scalars(
                query.order_by(model.next_attempt_at, model.id).limit(limit).with_for_update(skip_locked=True)
            ).all()
        )
        if ids:
            session.execute(
                update(model)
                .where(model.id.in_(ids))
                .values(next_attempt_at=now + lease, updated_at=now)
                .execution_options(synchronize_session=False)
            )
    return ids


def count_attempt(row: Outgoing, ok: bool, detail: str, policy: RetryPolicy, finished: dt.datetime) -> float | None:
    """Count one attempt on ``row``: ``sent`` when ``ok``, else ``dead`` after ``max_attempts`` or retried later.
    The delay before the retry, None when there is none. A row that is no longer pending (superseded while it
    was being sent) keeps its state."""
    if row.state != db.FORWARD_PENDING:
        return None
    row.attempts += 1
    row.updated_at = finished
    if ok:
        row.state = db.FORWARD_SENT
        row.next_attempt_at = None
        row.last_error = None
        return None
    row.last_error = detail
    if row.attempts >= policy.max_attempts:
        row.state = db.FORWARD_DEAD
        row.next_attempt_at = None
        return None
    delay = retry_delay(row.attempts, policy.backoff_seconds, policy.backoff_max_seconds)
    row.next_attempt_at = finished + dt.timedelta(seconds=delay)
    return delay


def requeue_dead(sessions: sessionmaker[Session], model: type[Outgoing], now: dt.datetime) -> int:
    """Dead rows of ``model`` back to pending with a fresh attempt budget; the number requeued. HL7 messages and
    FHIR bundles that could not be built (nothing to send) stay dead."""
    condition = [model.state == db.FORWARD_DEAD]
    if model is db.HL7Message:
        condition.append(db.HL7Message.message.is_not(None))
    if model is db.FHIRReport:
        condition.append(db.FHIRReport.bundle.is_not(None))
    with sessions() as session, session.begin():
        result = session.execute(
            update(model)
            .where(*condition)
            .values(state=db.FORWARD_PENDING, attempts=0, next_attempt_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    return int(result.rowcount or 0)


def supersede(session: Session, model: StudyOutgoing, study_id: int, destination: str, now: dt.datetime) -> bool:
    """Mark the unsent (pending or dead) rows of ``model`` for this study and destination ``superseded``, before a
    newer one is added; whether an earlier one was sent (the newer one is then a correction)."""
    rows: Sequence[db.HL7Message | db.OrthancMetadata | db.FHIRReport] = session.scalars(
        select(model).where(model.study_id == study_id, model.destination == destination)
    ).all()
    for row in rows:
        if row.state in (db.FORWARD_PENDING, db.FORWARD_DEAD):
            row.state = db.FORWARD_SUPERSEDED
            row.next_attempt_at = None
            row.updated_at = now
    return any(row.state == db.FORWARD_SENT for row in rows)
