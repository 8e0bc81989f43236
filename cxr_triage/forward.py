"""``cxr-triage forward``: forwarding of Structured Reports to the PACS, and the command to list or resend what
goes out (SRs, HL7 messages to the RIS, Orthanc metadata).

Each SR gets one ``forwards`` row per ``[forward] destinations`` entry, state ``pending``. The housekeeping sends
due rows (``process_due``), one association per destination per round: success -> ``sent``; failure -> retried
after ``scu.retry_delay(attempt, backoff_seconds, backoff_max_seconds)``, and after ``max_attempts`` attempts the
row goes to the dead-letter state ``dead`` with its last error (``cxr_triage.delivery``, which HL7 messages and
Orthanc metadata share). ``cxr-triage forward --retry`` puts dead rows of all three back to pending and sends every
pending row now.

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
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import db, delivery, hl7, orthanc, srfiles
from cxr_triage.scu import SendResult, send_datasets
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
    ids = delivery.claim_due(sessions, db.Forward, now, lease, force, MAX_PER_ROUND)
    if not ids:
        return []
    with sessions() as session:
        db.read_only(session)
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
            srfiles.ensure_final(path)  # its rename may be a moment behind its commit
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
    row.status = result.status
    delay = delivery.count_attempt(row, result.ok, result.detail, forwarding, finished)
    if row.state == db.FORWARD_SENT:
        logger.info("SR %s forwarded to %s", sr_uid, destination_text)
    elif row.state == db.FORWARD_DEAD:
        logger.error("SR %s to %s: dead after %d attempts: %s", sr_uid, destination_text, row.attempts, result.detail)
    elif delay is not None:
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
    return delivery.requeue_dead(sessions, db.Forward, now or db.utcnow())


# --- the command ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument(
        "--retry",
        action="store_true",
        help="put dead SR forwards, HL7 messages and Orthanc updates back to pending and send all now",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _print(records: list[dict[str, Any]], as_json: bool, empty: str = "") -> None:
    """One line per row (SR forward, HL7 message, Orthanc update); ``empty`` goes to stderr when there is none
    (JSON output stays empty then)."""
    if not records and empty:
        print(empty, file=sys.stderr)
    for record in records:
        if as_json:
            print(json.dumps(record))
            continue
        if record["kind"] == "sr":
            uid, destination = record["sr_sop_instance_uid"], record["destination"]
            answer = "" if record["status"] is None else f" 0x{record['status']:04X}"
        else:
            uid, destination = record["study_instance_uid"], f"{record['kind']}:{record['destination']}"
            answer = f" {record['ack']}" if record.get("ack") else ""
        detail = f"\t{record['detail']}" if record.get("detail") else ""
        print(f"{uid}\t{destination}\t{record['state']}\tattempts={record['attempts']}{answer}{detail}")


def _sr_record(o: ForwardOutcome) -> dict[str, Any]:
    return {
        "kind": "sr",
        "sr_sop_instance_uid": o.sr_sop_instance_uid,
        "destination": o.destination,
        "state": o.state,
        "attempts": o.attempts,
        "status": o.status,
        "detail": o.detail,
    }


def _hl7_record(o: hl7.HL7Outcome) -> dict[str, Any]:
    return {
        "kind": "hl7",
        "study_instance_uid": o.study_instance_uid,
        "control_id": o.control_id,
        "destination": o.destination,
        "state": o.state,
        "attempts": o.attempts,
        "ack": o.ack,
        "detail": o.detail,
    }


def _orthanc_record(o: orthanc.OrthancOutcome) -> dict[str, Any]:
    return {
        "kind": "orthanc",
        "study_instance_uid": o.study_instance_uid,
        "destination": o.destination,
        "state": o.state,
        "attempts": o.attempts,
        "detail": o.detail,
    }


def _retry(args: argparse.Namespace, context: Context) -> int:
    sessions = db.session_factory(context.db)
    settings = context.settings
    now = db.utcnow()
    requeued = requeue_dead(sessions, now)
    requeued += delivery.requeue_dead(sessions, db.HL7Message, now)
    requeued += delivery.requeue_dead(sessions, db.OrthancMetadata, now)
    records = [_sr_record(o) for o in process_due(sessions, settings.forward, force=True)]
    messages = _drain(lambda tried: hl7.process_due(sessions, settings.hl7, force=True, exclude=tried))
    records += [_hl7_record(o) for o in messages.values()]
    updates = _drain(lambda tried: orthanc.process_due(sessions, settings.forward, force=True, exclude=tried))
    records += [_orthanc_record(o) for o in updates.values()]
    logger.info("requeued %d dead row(s); sent %d", requeued, len(records))
    _print(records, args.json, empty=f"nothing to send: no forward was pending or dead ({requeued} requeued)")
    with db.read_session(context.db) as session:
        unbuilt = session.scalar(
            select(func.count()).where(db.HL7Message.state == db.FORWARD_DEAD, db.HL7Message.message.is_(None))
        )
    if unbuilt:
        print(
            f"{unbuilt} HL7 message(s) could not be built and stay dead: `cxr-triage forward` says why", file=sys.stderr
        )
    return 0 if all(r["state"] == db.FORWARD_SENT for r in records) and not unbuilt else 1


_Outcome = TypeVar("_Outcome", hl7.HL7Outcome, orthanc.OrthancOutcome)


def _drain(send: Callable[[Collection[int]], list[_Outcome]]) -> dict[int, _Outcome]:
    """Call ``send`` (one round of a ``process_due``, given the ids already tried) until nothing is left: every
    pending row tried once, by row id."""
    outcomes: dict[int, _Outcome] = {}
    while batch := send(outcomes.keys()):
        outcomes.update((o.row_id, o) for o in batch)
    return outcomes


def _list_records(session: Session) -> list[dict[str, Any]]:
    """Every SR forward, then every HL7 message, then every Orthanc update, oldest first."""

    def when(moment: dt.datetime | None) -> str | None:
        return moment.isoformat() if moment else None

    records = [
        {
            **_sr_record(ForwardOutcome(f.id, uid, f.destination, f.state, f.attempts, f.status, f.last_error or "")),
            "detail": f.last_error,
            "next_attempt_at": when(f.next_attempt_at),
        }
        for f, uid in session.execute(
            select(db.Forward, db.SRDocument.sop_instance_uid)
            .join(db.SRDocument, db.Forward.sr_id == db.SRDocument.id)
            .order_by(db.Forward.id)
        ).all()
    ]
    for m, uid in session.execute(
        select(db.HL7Message, db.Study.study_instance_uid).join(db.Study).order_by(db.HL7Message.id)
    ).all():
        outcome = hl7.HL7Outcome(
            m.id, uid, m.control_id, m.destination, m.state, m.attempts, m.ack_code, m.last_error or ""
        )
        records.append(
            {**_hl7_record(outcome), "result_status": m.result_status, "next_attempt_at": when(m.next_attempt_at)}
        )
    for u, uid in session.execute(
        select(db.OrthancMetadata, db.Study.study_instance_uid).join(db.Study).order_by(db.OrthancMetadata.id)
    ).all():
        outcome = orthanc.OrthancOutcome(u.id, uid, u.destination, u.state, u.attempts, u.last_error or "")
        records.append({**_orthanc_record(outcome), "values": u.values, "next_attempt_at": when(u.next_attempt_at)})
    return records


def _list(args: argparse.Namespace, context: Context) -> int:
    with db.read_session(context.db) as session:
        records = _list_records(session)
    settings = context.settings
    forwards = "" if settings.forward.destinations else " ([forward] destinations is empty)"
    messages = "" if settings.hl7.destinations else " ([hl7] destinations is empty)"
    _print(records, args.json, empty=f"no SR forwards recorded{forwards}, no HL7 messages recorded{messages}")
    return 0


def run(args: argparse.Namespace) -> int:
    from cxr_triage.bootstrap import CURRENT, run_command

    body = _retry if args.retry else _list
    return run_command(args, "forward", lambda context: body(args, context), database=CURRENT)
