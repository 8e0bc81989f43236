"""The life of an outgoing row (an SR forward by C-STORE or STOW-RS, an HL7 message, an Orthanc metadata update, a
FHIR report), the same for every output: ``pending -> sent | dead``, ``pending | dead -> superseded`` and
``dead -> pending``. Who changes what:

- ``new_row`` (an output's ``enqueue``, in the transaction of what the row reports on: the recorder's for an SR,
  the study aggregation's for a study): a new row, ``pending`` and due now, or ``dead`` from the start with why
  when its payload could not be built;
- ``supersede`` (a study output's ``enqueue``, in the same transaction, before it adds the newer row): the study's
  unsent (``pending`` or ``dead``) rows for that destination become ``superseded``; they are never sent, so a
  stale result cannot arrive after the corrected one;
- ``claim_due`` / ``Outbox.claim`` (the housekeeping's send job of each output, and ``cxr-triage forward
  --retry``): due ``pending`` rows are leased (SKIP LOCKED) by pushing their ``next_attempt_at`` past the time a
  send may take; the state stays ``pending``, so two processes never send the same row at once and a process
  killed mid-send leaves the row to be retried when the lease passes;
- ``count_attempt`` / ``Outbox.record`` (the same sender, after its sends, in one transaction): one attempt
  counted on each row, with the peer's answer: ``sent`` on success; on failure retried after ``retry_delay(attempt,
  backoff_seconds, backoff_max_seconds)``, or ``dead`` with its last error after ``max_attempts``. A row that is
  no longer ``pending`` (superseded while it was being sent) keeps its state;
- ``requeue_dead`` (``cxr-triage forward --retry``): ``dead`` rows back to ``pending`` with a fresh attempt
  budget, except those whose payload could not be built (nothing to send; ``unbuilt`` counts them).

Each output module declares its ``Outbox`` (``sr_outbox`` for the two that deliver SRs): its table (whose rows
report on an SR or a study), its outcome dataclass, its log lines and the column that keeps the peer's answer. The
module sends; the ``Outbox`` claims, records (``count_attempt``, the log lines), and says how ``cxr-triage
forward`` prints an outcome (``as_record``) and lists the rows (``listed``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, Protocol, TypeAlias, TypeVar

from sqlalchemy import ColumnElement, Row, func, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

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


def _payload(model: type[Outgoing]) -> InstrumentedAttribute[str | None] | None:
    """The column of a payload that ``enqueue`` builds and may fail to build (the HL7 message, the FHIR Bundle);
    None for the kinds whose rows always have something to send."""
    if model is db.HL7Message:
        return db.HL7Message.message
    if model is db.FHIRReport:
        return db.FHIRReport.bundle
    return None


def unbuilt(session: Session, model: type[Outgoing]) -> int:
    """Rows of ``model`` whose payload could not be built: dead for good (``forward --retry`` cannot send what does
    not exist)."""
    payload = _payload(model)
    if payload is None:
        return 0
    return int(session.scalar(select(func.count()).where(model.state == db.FORWARD_DEAD, payload.is_(None))) or 0)


def requeue_dead(sessions: sessionmaker[Session], model: type[Outgoing], now: dt.datetime) -> int:
    """Dead rows of ``model`` back to pending with a fresh attempt budget; the number requeued. HL7 messages and
    FHIR bundles that could not be built (nothing to send) stay dead."""
    condition = [model.state == db.FORWARD_DEAD]
    if (payload := _payload(model)) is not None:
        condition.append(payload.is_not(None))
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


def _reports_on(table: type[Outgoing]) -> tuple[InstrumentedAttribute[str], ColumnElement[bool]]:
    """The column of what a row of ``table`` reports on (its SR's SOP Instance UID, or its study's UID), and how
    the row joins it."""
    if issubclass(table, db.Forward | db.DicomwebStore):
        return db.SRDocument.sop_instance_uid, table.sr_id == db.SRDocument.id
    return db.Study.study_instance_uid, table.study_id == db.Study.id


class Outcome(Protocol):
    """What became of one row, an output's frozen dataclass: its first field is the row's id, the others are what
    ``cxr-triage forward`` prints, in order (``Outbox.as_record``), among them ``state``, ``attempts`` and
    ``detail``."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def state(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def detail(self) -> str: ...


_Out = TypeVar("_Out", bound=Outcome)


@dataclass(frozen=True)
class Attempt:
    """One send of one row as its sender saw it: the row, what it reports on (the SR's SOP Instance UID or the
    study's UID), whether the peer took it, the peer's answer (a C-STORE or HTTP status, an ACK code; None when
    none came) and what to log and keep as the row's last error."""

    row_id: int
    subject: str
    ok: bool
    answer: int | str | None
    detail: str


def _no_columns(row: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Outbox(Generic[_Row, _Out]):
    """One output's rows: claimed, recorded, printed and listed the same way as every other output's.

    ``outcome(row, subject, detail)`` builds the output's ``Outcome`` of a row, given what it reports on (its SR's
    SOP Instance UID, or its study's UID). ``sent`` (INFO) and ``about`` (the start of the WARNING and ERROR lines
    of a failed attempt) are logged with the outcome's fields by name (``%(destination)s``). ``answer`` names the
    row's column that keeps the peer's answer (``Attempt.answer``), if it has one; ``listing`` gives the columns
    ``cxr-triage forward`` lists beside the outcome."""

    kind: str
    table: type[_Row]
    outcome: Callable[[_Row, str, str], _Out]
    logger: logging.Logger
    sent: str
    about: str
    answer: str | None = None
    listing: Callable[[_Row], dict[str, Any]] = _no_columns

    def claim(
        self,
        sessions: sessionmaker[Session],
        now: dt.datetime,
        lease: dt.timedelta,
        force: bool,
        limit: int,
        exclude: Collection[int],
        *columns: Any,
    ) -> Sequence[Row[Any]]:
        """Lease the due rows (``claim_due``) and read ``columns`` of each (of the row and of what it reports on),
        oldest row first; none when none is due."""
        ids = claim_due(sessions, self.table, now, lease, force, limit, exclude)
        if not ids:
            return []
        subject, on = _reports_on(self.table)
        with sessions() as session:
            db.read_only(session)
            query = select(*columns).join(subject.class_, on).where(self.table.id.in_(ids))
            return session.execute(query.order_by(self.table.id)).all()

    def record(self, sessions: sessionmaker[Session], policy: RetryPolicy, attempts: Sequence[Attempt]) -> list[_Out]:
        """Count each attempt on its row (``count_attempt``, the peer's answer kept) and log it, in one transaction
        (none without attempts); the outcomes, in order (a row that no longer exists has none)."""
        outcomes: list[_Out] = []
        if not attempts:
            return outcomes
        finished = db.utcnow()
        with sessions() as session, session.begin():
            for attempt in attempts:
                row = session.get(self.table, attempt.row_id)
                if row is None:
                    continue
                if self.answer:
                    setattr(row, self.answer, attempt.answer)
                delay = count_attempt(row, attempt.ok, attempt.detail, policy, finished)
                outcome = self.outcome(row, attempt.subject, attempt.detail)
                self._log(outcome, delay)
                outcomes.append(outcome)
        return outcomes

    def _log(self, outcome: _Out, delay: float | None) -> None:
        said = {**_printed(outcome), "delay": delay}
        if outcome.state == db.FORWARD_SENT:
            self.logger.info(self.sent, said)
        elif outcome.state == db.FORWARD_DEAD:
            self.logger.error(f"{self.about}: dead after %(attempts)d attempts: %(detail)s", said)
        elif delay is not None:
            self.logger.warning(f"{self.about}: attempt %(attempts)d failed (%(detail)s); retry in %(delay).0f s", said)

    def as_record(self, outcome: _Out) -> dict[str, Any]:
        """An outcome as ``cxr-triage forward`` prints it: the output's kind, then the outcome's fields but its id."""
        return {"kind": self.kind, **_printed(outcome)}

    def listed(self, session: Session) -> list[dict[str, Any]]:
        """Every row, oldest first, as ``cxr-triage forward`` lists it: its outcome so far (the last error as the
        detail), the ``listing`` columns and when it is tried next."""
        records = []
        subject, on = _reports_on(self.table)
        query = select(self.table, subject).join(subject.class_, on).order_by(self.table.id)
        for row, uid in session.execute(query).all():
            outcome = self.outcome(row, uid, row.last_error or "")
            when = row.next_attempt_at.isoformat() if row.next_attempt_at else None
            records.append({**self.as_record(outcome), **self.listing(row), "next_attempt_at": when})
        return records


def _printed(outcome: Outcome) -> dict[str, Any]:
    """The fields of ``outcome`` but the first (its row's id), by name, in order."""
    return {field.name: getattr(outcome, field.name) for field in fields(outcome)[1:]}


@dataclass(frozen=True)
class SROutcome:
    """What became of an SR's delivery (with its heatmap object) to one destination: ``status`` is the peer's (the
    C-STORE response status, or the STOW-RS HTTP status), None when none came."""

    row_id: int
    sr_sop_instance_uid: str
    destination: str
    state: str
    attempts: int
    status: int | None
    detail: str


_SRRow = TypeVar("_SRRow", db.Forward, db.DicomwebStore)
_SROut = TypeVar("_SROut", bound=SROutcome)


def sr_outbox(
    kind: str, table: type[_SRRow], outcome: type[_SROut], logger: logging.Logger, sent: str, about: str
) -> Outbox[_SRRow, _SROut]:
    """The ``Outbox`` of an output that delivers SRs: its rows keep the peer's status in ``status`` and are listed
    with their last error as it is (None when there is none)."""
    return Outbox(
        kind,
        table,
        lambda row, uid, detail: outcome(row.id, uid, row.destination, row.state, row.attempts, row.status, detail),
        logger,
        sent,
        about,
        answer="status",
        listing=lambda row: {"detail": row.last_error},
    )
