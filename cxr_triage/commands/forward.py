"""``cxr-triage forward``: list what goes out (SRs to the PACS, HL7 messages to the RIS, Orthanc metadata, FHIR
reports) and its state, or (``--retry``) put the dead rows of every output back to pending and send every pending
row now.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.outputs import delivery, forward
from cxr_triage.outputs.registry import OUTPUTS, Output, start_up_checks

if TYPE_CHECKING:
    from cxr_triage.core.bootstrap import Context
    from cxr_triage.core.settings import Settings

logger = logging.getLogger(log_name(forward.__name__))
"""The forward module's logger: the command's lines name what they report on."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument(
        "--retry",
        action="store_true",
        help="put dead SR forwards (C-STORE, STOW-RS), HL7 messages, Orthanc updates and FHIR reports back to pending "
        "and send all now",
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
        elif "sr_sop_instance_uid" in record:  # an SR by another route (STOW-RS): its HTTP status
            uid, destination = record["sr_sop_instance_uid"], f"{record['kind']}:{record['destination']}"
            answer = "" if record["status"] is None else f" HTTP {record['status']}"
        else:
            uid, destination = record["study_instance_uid"], f"{record['kind']}:{record['destination']}"
            answer = f" {record['ack']}" if record.get("ack") else ""
            answer += f" HTTP {record['http_status']}" if record.get("http_status") else ""
        detail = f"\t{record['detail']}" if record.get("detail") else ""
        print(f"{uid}\t{destination}\t{record['state']}\tattempts={record['attempts']}{answer}{detail}")


def _retry(args: argparse.Namespace, context: Context) -> int:
    sessions = db.session_factory(context.db)
    settings = context.settings
    now = db.utcnow()
    requeued = sum(delivery.requeue_dead(sessions, output.table, now) for output in OUTPUTS)
    records = []
    for output in OUTPUTS:
        sent = _drain(output, sessions, settings) if output.drain else output.send_due(sessions, settings, True, ())
        records += [output.as_record(o) for o in sent]
    logger.info("requeued %d dead row(s); sent %d", requeued, len(records))
    _print(records, args.json, empty=f"nothing to send: no forward was pending or dead ({requeued} requeued)")
    stuck = 0
    with db.read_session(context.db) as session:
        for output in OUTPUTS:
            unsendable = output.unsendable(session) if output.unsendable else 0
            if unsendable:
                print(f"{unsendable} {output.unsendable_note}", file=sys.stderr)
            stuck += unsendable
    return 0 if all(r["state"] == db.FORWARD_SENT for r in records) and not stuck else 1


def _drain(output: Output, sessions: sessionmaker[Session], settings: Settings) -> list[Any]:
    """Rounds of ``output.send_due`` (given the row ids already tried) until nothing is left: every pending row
    tried once, the last outcome of each."""
    outcomes: dict[int, Any] = {}
    while batch := output.send_due(sessions, settings, True, outcomes.keys()):
        outcomes.update((o.row_id, o) for o in batch)
    return list(outcomes.values())


def _list_records(session: Session) -> list[dict[str, Any]]:
    """Every output's rows in the registry's order (SR forwards, HL7 messages, Orthanc updates), oldest first."""
    return [record for output in OUTPUTS for record in output.listed(session)]


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
    return run_command(args, "forward", lambda context: body(args, context), database=CURRENT, checks=start_up_checks())
