"""``cxr-triage forward``: list what goes out (SRs to the PACS, HL7 messages to the RIS, Orthanc metadata) and
its state, or (``--retry``) put the dead rows of all three back to pending and send every pending row now.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.outputs import delivery, hl7, orthanc
from cxr_triage.outputs.forward import ForwardOutcome, process_due, requeue_dead

logger = logging.getLogger(log_name(ForwardOutcome.__module__))
"""The forward module's logger: the command's lines name what they report on."""


if TYPE_CHECKING:
    from cxr_triage.core.bootstrap import Context


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
    from cxr_triage.core.bootstrap import CURRENT, run_command

    body = _retry if args.retry else _list
    return run_command(
        args, "forward", lambda context: body(args, context), database=CURRENT, checks=(hl7.check_settings,)
    )
