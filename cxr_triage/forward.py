"""``cxr-triage forward``: forwarding of Structured Reports to the PACS, and the command to list or resend them.

Each SR gets one ``forwards`` row per ``[forward] destinations`` entry, state ``pending``. The worker loop sends
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import db

logger = logging.getLogger(__name__)

MAX_PER_ROUND = 100
"""Most forwards sent by one worker in one round."""


def destinations(config: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    """The configured destinations as validated ``scu.Destination`` objects (a bad entry raises ValueError)."""
    from cxr_triage.scu import Destination

    return [Destination.from_mapping(entry) for entry in config["forward"]["destinations"]]


def parse_destination(text: str, configured: list[Any] | None = None) -> Any:
    """``AE@host:port`` (how a destination is stored) back to a ``scu.Destination``: the configured one of that
    name (with its ``tls`` setting) when there is one, else a plain one."""
    from cxr_triage.scu import Destination

    for destination in configured or ():
        if str(destination) == text:
            return destination
    ae_title, _, rest = text.partition("@")
    host, _, port = rest.rpartition(":")
    return Destination(ae_title=ae_title, host=host, port=int(port))


def tls_context(config: Mapping[str, Mapping[str, Any]]) -> Any:
    """The client TLS context of ``[forward] tls_*`` (used for destinations with ``tls = true``)."""
    from cxr_triage.scu import client_tls_context

    fcfg = config["forward"]
    return client_tls_context(str(fcfg["tls_ca_file"]), str(fcfg["tls_certificate"]), str(fcfg["tls_private_key"]))


def enqueue(session: Session, sr: db.SRDocument, config: Mapping[str, Mapping[str, Any]], now: dt.datetime) -> int:
    """Add a pending forward of ``sr`` to every configured destination; the number added."""
    added = 0
    for destination in destinations(config):
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
        added += 1
    return added


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
    config: Mapping[str, Mapping[str, Any]],
    now: dt.datetime | None = None,
    force: bool = False,
) -> list[ForwardOutcome]:
    """Send the forwards that are due (all pending ones when ``force``), one association per destination."""
    import pydicom

    from cxr_triage.scu import SendResult, retry_delay, send_datasets

    fcfg = config["forward"]
    timeout = float(fcfg["timeout"])
    now = now or db.utcnow()
    claimed = _claim_due(sessions, now, dt.timedelta(seconds=4 * timeout + 60), force)
    if not claimed:
        return []
    by_destination: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for forward_id, destination, path, sr_uid in claimed:
        by_destination[destination].append((forward_id, path, sr_uid))
    outcomes: list[ForwardOutcome] = []
    try:
        configured = destinations(config)
    except ValueError:  # the rows still name their destinations; each send below records its own outcome
        logger.exception("[forward] destinations are invalid")
        configured = []
    context = None  # built for the first TLS destination; a TLS settings error is recorded on its forwards
    for destination_text, items in by_destination.items():
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
        try:
            destination = parse_destination(destination_text, configured)
            if destination.tls and context is None:
                context = tls_context(config)
            sent = send_datasets(
                datasets, destination, str(fcfg["calling_ae_title"]), timeout=timeout, tls_context=context
            )
        except Exception as exc:  # a malformed destination or calling AE title: a configuration error
            logger.exception("forwarding to %s failed", destination_text)
            sent = [SendResult(False, None, f"{type(exc).__name__}: {exc}")] * len(sendable)
        results.update(zip(sendable, sent, strict=True))
        finished = db.utcnow()
        with sessions() as session, session.begin():
            for forward_id, _, sr_uid in items:
                result = results[forward_id]
                row = session.get(db.Forward, forward_id)
                if row is None:
                    continue
                row.attempts += 1
                row.status = result.status
                row.updated_at = finished
                if result.ok:
                    row.state = db.FORWARD_SENT
                    row.next_attempt_at = None
                    row.last_error = None
                    logger.info("SR %s forwarded to %s", sr_uid, destination_text)
                elif row.attempts >= int(fcfg["max_attempts"]):
                    row.state = db.FORWARD_DEAD
                    row.next_attempt_at = None
                    row.last_error = result.detail
                    logger.error(
                        "SR %s to %s: dead after %d attempts: %s", sr_uid, destination_text, row.attempts, result.detail
                    )
                else:
                    delay = retry_delay(
                        row.attempts, float(fcfg["backoff_seconds"]), float(fcfg["backoff_max_seconds"])
                    )
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
                outcomes.append(
                    ForwardOutcome(
                        forward_id, sr_uid, destination_text, row.state, row.attempts, result.status, result.detail
                    )
                )
    return outcomes


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


def run(args: argparse.Namespace) -> int:
    from cxr_triage.config import ConfigError, load_config
    from cxr_triage.dbcli import DatabaseNotReady, open_current

    try:
        config = load_config(args.config)
        destinations(config.values)
        engine = open_current(config["database"]["url"], args.config)
    except (ConfigError, ValueError, DatabaseNotReady) as exc:
        print(f"cxr-triage forward: {exc}", file=sys.stderr)
        return 2
    try:
        sessions = db.session_factory(engine)
        if args.retry:
            requeued = requeue_dead(sessions)
            outcomes = process_due(sessions, config.values, force=True)
            logger.info("requeued %d dead forward(s); sent %d", requeued, len(outcomes))
            _print(
                [
                    {
                        "sr_sop_instance_uid": o.sr_sop_instance_uid,
                        "destination": o.destination,
                        "state": o.state,
                        "attempts": o.attempts,
                        "status": o.status,
                        "detail": o.detail,
                    }
                    for o in outcomes
                ],
                args.json,
                empty=f"nothing to send: no forward was pending or dead ({requeued} requeued)",
            )
            return 0 if all(o.state == db.FORWARD_SENT for o in outcomes) else 1
        with db.read_session(engine) as session:
            rows = session.execute(
                select(db.Forward, db.SRDocument.sop_instance_uid)
                .join(db.SRDocument, db.Forward.sr_id == db.SRDocument.id)
                .order_by(db.Forward.id)
            ).all()
            _print(
                [
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
                ],
                args.json,
                empty="no SR forwards recorded"
                + ("" if destinations(config.values) else " ([forward] destinations is empty)"),
            )
        return 0
    finally:
        engine.dispose()
