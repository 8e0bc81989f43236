"""``cxr-triage forward``: forwarding of Structured Reports to the PACS, and the command to list or resend them.

Each SR gets one ``forwards`` row per ``[forward] destinations`` entry, state ``pending``. The housekeeping sends
due rows (``process_due``), one association per destination per round: success -> ``sent``; failure -> retried
after ``scu.retry_delay(attempt, backoff_seconds, backoff_max_seconds)``, and after ``max_attempts`` attempts the
row goes to the dead-letter state ``dead`` with its last error. ``cxr-triage forward --retry`` puts dead rows
back to pending and sends every pending row now.

A row being sent is leased by pushing its ``next_attempt_at`` past the send's timeout, so two workers never send
the same SR at once; a worker killed mid-send leaves the row pending, to be retried when that lease passes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import db
from cxr_triage.scu import SendResult, retry_delay, send_datasets
from cxr_triage.settings import ForwardSettings

if TYPE_CHECKING:
    import ssl

    from cxr_triage.bootstrap import Context

logger = logging.getLogger(__name__)

MAX_PER_ROUND = 100
"""Most forwards sent by one worker in one round."""


def enqueue(session: Session, sr: db.SRDocument, forwarding: ForwardSettings, now: dt.datetime) -> int:
    """Add a pending forward of ``sr`` to every configured destination; the number added."""
    for destination in forwarding.destinations:
        session.add(
            db.Forward(
                sr_id=sr.id,
                destination=str(destination),
                attempts=0,
                state=db.FORWARD_PENDING,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
        )
    return len(forwarding.destinations)


@dataclass(frozen=True)
class ForwardOutcome:
    forward_id: int
    sr_sop_instance_uid: str
    destination: str
    state: str
    attempts: int
    status: int | None
    detail: str


def _claim_due(
    sessions: sessionmaker[Session], now: dt.datetime, lease: dt.timedelta, force: bool
) -> list[tuple[int, str, str, str]]:
    with sessions() as session, session.begin():
        query = select(db.Forward.id).where(db.Forward.state == db.FORWARD_PENDING)
        if not force:
            query = query.where(db.Forward.next_attempt_at <= now)
        ids = session.scalars(
            query.order_by(db.Forward.next_attempt_at, db.Forward.id)
            .limit(MAX_PER_ROUND)
            .with_for_update(skip_locked=True)
        ).all()
        if not ids:
            return []
        session.execute(
            update(db.Forward)
            .where(db.Forward.id.in_(ids))
            .values(next_attempt_at=now + lease, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        rows = session.execute(
            select(db.Forward.id, db.Forward.destination, db.SRDocument.path, db.SRDocument.sop_instance_uid)
            .join(db.SRDocument, db.Forward.sr_id == db.SRDocument.id)
            .where(db.Forward.id.in_(ids))
            .order_by(db.Forward.id)
        ).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def process_due(
    sessions: sessionmaker[Session],
    forwarding: ForwardSettings,
    now: dt.datetime | None = None,
    force: bool = False,
) -> list[ForwardOutcome]:
    """Send the forwards that are due (all pending ones when ``force``), one association per destination."""
    timeout = forwarding.timeout
    now = now or db.utcnow()
    claimed = _claim_due(sessions, now, dt.timedelta(seconds=4 * timeout + 60), force)
    if not claimed:
        return []
    by_destination: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for forward_id, destination, path, sr_uid in claimed:
        by_destination[destination].append((forward_id, path, sr_uid))
    outcomes: list[ForwardOutcome] = []
    context = None  # built for the first TLS destination; a TLS error is recorded on its forwards
    for destination_text, items in by_destination.items():
        results, datasets, sendable = _read_datasets(items)
        sent, context = _send_to(forwarding, destination_text, datasets, context)
        results.update(zip(sendable, sent, strict=True))
        outcomes += _record_results(sessions, forwarding, destination_text, items, results)
    return outcomes


def _read_datasets(items: list[tuple[int, str, str]]) -> tuple[dict[int, SendResult], list[Any], list[int]]:
    """Read the SR files of ``items`` (forward id, path, SR UID): the failed results of the unreadable ones, the
    datasets read, and the forward ids of those datasets (in the same order)."""
    import pydicom

    results: dict[int, SendResult] = {}
    datasets = []
    sendable = []
    for forward_id, path, _ in items:
        try:
            datasets.append(pydicom.dcmread(path))
            sendable.append(forward_id)
        except Exception as exc:
            logger.exception("forward %s: cannot read SR file %s", forward_id, path)
            results[forward_id] = SendResult(False, None, f"cannot read SR file: {type(exc).__name__}: {exc}")
    return results, datasets, sendable


def _send_to(
    forwarding: ForwardSettings, destination_text: str, datasets: list[Any], context: ssl.SSLContext | None
) -> tuple[list[SendResult], ssl.SSLContext | None]:
    """Send ``datasets`` to the destination named ``destination_text``: one result per dataset, and the TLS context
    (``context``, or the one built here for the first TLS destination) for the next destinations."""
    try:
        destination = forwarding.destination(destination_text)
        if destination.tls and context is None:
            context = forwarding.client_tls_context()
        sent = send_datasets(
            datasets, destination, forwarding.calling_ae_title, timeout=forwarding.timeout, tls_context=context
        )
    except Exception as exc:  # a malformed destination or calling AE title: a configuration error
        logger.exception("forwarding to %s failed", destination_text)
        sent = [SendResult(False, None, f"{type(exc).__name__}: {exc}")] * len(datasets)
    return sent, context


def _record_results(
    sessions: sessionmaker[Session],
    forwarding: ForwardSettings,
    destination_text: str,
    items: list[tuple[int, str, str]],
    results: dict[int, SendResult],
) -> list[ForwardOutcome]:
    """Record the result of each forward of ``items`` in its row, in one transaction; the outcomes, in order."""
    outcomes: list[ForwardOutcome] = []
    finished = db.utcnow()
    with sessions() as session, session.begin():
        for forward_id, _, sr_uid in items:
            result = results[forward_id]
            row = session.get(db.Forward, forward_id)
            if row is None:
                continue
            _apply_result(row, result, forwarding, finished, sr_uid, destination_text)
            outcomes.append(
                ForwardOutcome(
                    forward_id, sr_uid, destination_text, row.state, row.attempts, result.status, result.detail
                )
            )
    return outcomes


def _apply_result(
    row: db.Forward,
    result: SendResult,
    forwarding: ForwardSettings,
    finished: dt.datetime,
    sr_uid: str,
    destination_text: str,
) -> None:
    """Count the attempt on ``row``: sent on success, else dead after ``max_attempts`` or retried after a delay."""
    row.attempts += 1
    row.status = result.status
    row.updated_at = finished
    if result.ok:
        row.state = db.FORWARD_SENT
        row.next_attempt_at = None
        row.last_error = None
        logger.info("SR %s forwarded to %s", sr_uid, destination_text)
    elif row.attempts >= forwarding.max_attempts:
        row.state = db.FORWARD_DEAD
        row.next_attempt_at = None
        row.last_error = result.detail
        logger.error("SR %s to %s: dead after %d attempts: %s", sr_uid, destination_text, row.attempts, result.detail)
    else:
        delay = retry_delay(row.attempts, forwarding.backoff_seconds, forwarding.backoff_max_seconds)
        row.next_attempt_at = finished + dt.timedelta(seconds=delay)
        row.last_error = result.detail
        logger.warning(
            "SR %s to %s: attempt %d failed (%s); retry in %.0f s",
            sr_uid,
            destination_text,
            row.attempts,
            result.detail,
            delay,
        )


def requeue_dead(sessions: sessionmaker[Session], now: dt.datetime | None = None) -> int:
    """Dead forwards back to pending with a fresh attempt budget; the number requeued."""
    now = now or db.utcnow()
    with sessions() as session, session.begin():
        result = session.execute(
            update(db.Forward)
            .where(db.Forward.state == db.FORWARD_DEAD)
            .values(state=db.FORWARD_PENDING, attempts=0, next_attempt_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    return int(result.rowcount or 0)


# --- the command ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--retry", action="store_true", help="put dead forwards back to pending and send all now")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _print(records: list[dict[str, Any]], as_json: bool, empty: str = "") -> None:
    """One line per forward; ``empty`` goes to stderr when there is none (JSON output stays empty then)."""
    if not records and empty:
        print(empty, file=sys.stderr)
    for record in records:
        if as_json:
            print(json.dumps(record))
        else:
            status = "" if record["status"] is None else f" 0x{record['status']:04X}"
            detail = f"\t{record['detail']}" if record.get("detail") else ""
            print(
                f"{record['sr_sop_instance_uid']}\t{record['destination']}\t{record['state']}"
                f"\tattempts={record['attempts']}{status}{detail}"
            )


def _retry(args: argparse.Namespace, context: Context) -> int:
    sessions = db.session_factory(context.db)
    requeued = requeue_dead(sessions)
    outcomes = process_due(sessions, context.settings.forward, force=True)
    logger.info("requeued %d dead forward(s); sent %d", requeued, len(outcomes))
    records = [
        {
            "sr_sop_instance_uid": o.sr_sop_instance_uid,
            "destination": o.destination,
            "state": o.state,
            "attempts": o.attempts,
            "status": o.status,
            "detail": o.detail,
        }
        for o in outcomes
    ]
    _print(records, args.json, empty=f"nothing to send: no forward was pending or dead ({requeued} requeued)")
    return 0 if all(o.state == db.FORWARD_SENT for o in outcomes) else 1


def _list(args: argparse.Namespace, context: Context) -> int:
    with db.read_session(context.db) as session:
        rows = session.execute(
            select(db.Forward, db.SRDocument.sop_instance_uid)
            .join(db.SRDocument, db.Forward.sr_id == db.SRDocument.id)
            .order_by(db.Forward.id)
        ).all()
        records = [
            {
                "sr_sop_instance_uid": uid,
                "destination": f.destination,
                "state": f.state,
                "attempts": f.attempts,
                "status": f.status,
                "detail": f.last_error,
                "next_attempt_at": f.next_attempt_at.isoformat() if f.next_attempt_at else None,
            }
            for f, uid in rows
        ]
    configured = "" if context.settings.forward.destinations else " ([forward] destinations is empty)"
    _print(records, args.json, empty=f"no SR forwards recorded{configured}")
    return 0


def run(args: argparse.Namespace) -> int:
    from cxr_triage.bootstrap import CURRENT, run_command

    body = _retry if args.retry else _list
    return run_command(args, "forward", lambda context: body(args, context), database=CURRENT)
