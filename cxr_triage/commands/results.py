"""``cxr-triage results``: what the database holds, one line (or JSON object) per received instance.

Keys: ``path`` (the spool file), ``sop_instance_uid``, ``status`` (``ok``, ``rejected``, ``error``, or ``queued``
/ ``processing`` while pending), ``label``, ``probabilities`` {covid, normal, pneumonia}, ``reason``,
``model_version``, ``precision`` (``float32`` or ``bfloat16``) and ``typicality`` (the typicality gate's score, on
classified and gate-refused instances: higher = less like a chest radiograph; about 0-2 for one, refused over the
gate's threshold), as ``classify --json`` has them; plus
``study_instance_uid``, ``received_at``, ``completed_at``, ``sr_sop_instance_uid``, ``flagged`` and
``spool_removed_at`` (when the retention policy deleted the spool file ``path``; null while it is kept), in order
of arrival.

The text output (one tab-separated line per instance, a header line first when standard output is a terminal or
with ``--header``) has the columns of ``TEXT_COLUMNS``: the priority is the worklist's (``triage.flags``: urgent,
priority, review, routine; ``-`` while pending) and the accession number the one stored at receipt (``-`` when
the images had none).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, Select, func, select
from sqlalchemy.orm import Session

from cxr_triage.core import db
from cxr_triage.core.settings import TriageSettings
from cxr_triage.triage import flags

if TYPE_CHECKING:
    from cxr_triage.core.bootstrap import Context

STATUS_NAMES = {db.DONE: "ok", db.REFUSED: "rejected", db.FAILED: "error"}
"""Database job states as ``classify`` names them; pending states keep their own names."""
TEXT_COLUMNS = (
    "received_at",
    "sop_instance_uid",
    "status",
    "priority",
    "accession_number",
    "label (or reason)",
    "probabilities",
    "flagged",
)
"""The header of the text output; a line that is not ``ok`` has its reason in the sixth column and ends there."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--study", default=None, metavar="UID", help="only this Study Instance UID")
    parser.add_argument("--since", default=None, metavar="ISO8601", help="only instances received at or after this")
    parser.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=120.0,
        default=None,
        metavar="SECONDS",
        help="first wait until no instance is queued or processing (at most SECONDS, default 120)",
    )
    parser.add_argument(
        "--header",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="text output: print a header line first (default: when standard output is a terminal)",
    )


def parse_since(text: str) -> dt.datetime:
    """ISO 8601 date or date-time; a time without zone is UTC."""
    value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _latest(model: Any) -> Any:
    """Subquery: the id of the newest row of ``model`` per instance (``db.newest_ids``)."""
    return db.newest_ids(model).subquery()


def records(session: Session, study: str | None = None, since: dt.datetime | None = None) -> Iterator[dict[str, Any]]:
    """One record per instance, in order of arrival; one query (the newest prediction, refusal and SR joined)."""
    for record, _ in listed(session, study, since):
        yield record


def listed(
    session: Session, study: str | None = None, since: dt.datetime | None = None
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """``records``, each with its study's accession number (the text output's column)."""
    for row in session.execute(_records_query(study, since).execution_options(yield_per=500)):
        yield _record(row), row.accession_number


def _records_query(study: str | None, since: dt.datetime | None) -> Select[Any]:
    """The instances (of ``study``, received since ``since``) in order of arrival, each with its newest prediction,
    refusal and SR outer-joined."""
    latest_prediction, latest_refusal, latest_sr = (
        _latest(db.PredictionRecord),
        _latest(db.RefusalRecord),
        _latest(db.SRDocument),
    )
    instance = db.Instance
    query = (
        select(
            instance.spool_path,
            instance.sop_instance_uid,
            instance.status,
            instance.error,
            instance.flagged,
            instance.flag_reason,
            instance.study_instance_uid,
            instance.received_at,
            instance.completed_at,
            instance.spool_removed_at,
            db.PredictionRecord.label,
            db.PredictionRecord.probabilities,
            db.PredictionRecord.model_version,
            db.PredictionRecord.precision,
            db.PredictionRecord.typicality,
            db.RefusalRecord.reason.label("refusal_reason"),
            db.RefusalRecord.typicality.label("refusal_typicality"),
            db.SRDocument.sop_instance_uid.label("sr_sop_instance_uid"),
            db.Study.accession_number,
        )
        .outerjoin(db.Study, db.Study.id == instance.study_id)
        .outerjoin(latest_prediction, latest_prediction.c.instance_id == instance.id)
        .outerjoin(db.PredictionRecord, db.PredictionRecord.id == latest_prediction.c.id)
        .outerjoin(latest_refusal, latest_refusal.c.instance_id == instance.id)
        .outerjoin(db.RefusalRecord, db.RefusalRecord.id == latest_refusal.c.id)
        .outerjoin(latest_sr, latest_sr.c.instance_id == instance.id)
        .outerjoin(db.SRDocument, db.SRDocument.id == latest_sr.c.id)
        .order_by(instance.received_at, instance.id)
    )
    if study:
        query = query.where(instance.study_instance_uid == study)
    if since:
        query = query.where(instance.received_at >= since)
    return query


def _reason(row: Any) -> str | None:
    """Why an instance was not classified plainly: its refusal, its error, or why it was flagged."""
    reason = None
    if row.status == db.REFUSED and row.refusal_reason is not None:
        reason = row.refusal_reason
    elif row.error:
        reason = row.error
    elif row.flagged:
        reason = row.flag_reason
    return reason


def _record(row: Any) -> dict[str, Any]:
    """The record of one row of :func:`_records_query`."""
    predicted = row.label is not None
    return {
        "path": row.spool_path,
        "sop_instance_uid": row.sop_instance_uid,
        "status": STATUS_NAMES.get(row.status, row.status),
        "label": row.label if predicted else None,
        "probabilities": {k: round(float(v), 6) for k, v in row.probabilities.items()} if predicted else None,
        "reason": _reason(row),
        "model_version": row.model_version if predicted else None,
        "precision": row.precision if predicted else None,
        "typicality": row.typicality if predicted else row.refusal_typicality,
        "study_instance_uid": row.study_instance_uid,
        "received_at": _iso(row.received_at),
        "completed_at": _iso(row.completed_at),
        "sr_sop_instance_uid": row.sr_sop_instance_uid,
        "flagged": bool(row.flagged),
        "spool_removed_at": _iso(row.spool_removed_at),
    }


def priority(record: dict[str, Any], triage: TriageSettings) -> str | None:
    """The worklist's priority of one instance (``triage.flags``): from its probabilities when classified, review
    when refused or failed, None while pending."""
    if record["status"] == "ok" and record["probabilities"]:
        return flags.instance_flag(record["probabilities"], triage, record["model_version"]).priority
    if record["status"] in ("rejected", "error"):
        return "review"
    return None


def format_record(
    record: dict[str, Any], as_json: bool, priority: str | None = None, accession_number: str | None = None
) -> str:
    if as_json:
        return json.dumps(record)
    fields = [record["received_at"], record["sop_instance_uid"], record["status"]]
    fields += [priority or "-", accession_number or "-"]
    if record["status"] == "ok":
        probs = " ".join(f"{k}={v:.3f}" for k, v in record["probabilities"].items())
        fields += [record["label"], probs, "FLAGGED" if record["flagged"] else ""]
    else:
        fields.append(record["reason"] or "")
    return "\t".join(str(f) for f in fields).rstrip("\t")


def pending(session: Session, study: str | None = None, since: dt.datetime | None = None) -> int:
    """How many instances (of ``study``, received since ``since``) are queued or being processed."""
    query = select(func.count()).where(db.Instance.status.in_((db.QUEUED, db.PROCESSING)))
    if study:
        query = query.where(db.Instance.study_instance_uid == study)
    if since:
        query = query.where(db.Instance.received_at >= since)
    return int(session.scalar(query) or 0)


def wait_until_finished(engine: Engine, seconds: float, study: str | None, since: dt.datetime | None) -> bool:
    """Poll until nothing is pending; False when ``seconds`` passed first."""
    deadline = time.monotonic() + seconds
    while True:
        with db.read_session(engine) as session:
            if pending(session, study, since) == 0:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def print_results(
    engine: Engine,
    as_json: bool,
    study: str | None,
    since: dt.datetime | None,
    triage: TriageSettings | None = None,
    header: bool = False,
) -> int:
    triage = triage or TriageSettings()
    count = 0
    if header and not as_json:
        print("\t".join(TEXT_COLUMNS))
    with db.read_session(engine) as session:
        for record, accession_number in listed(session, study, since):
            print(format_record(record, as_json, priority(record, triage), accession_number))
            count += 1
    sys.stdout.flush()
    return count


def _results(args: argparse.Namespace, context: Context) -> int:
    since = parse_since(args.since) if args.since else None
    if args.wait is not None and not wait_until_finished(context.db, args.wait, args.study, since):
        print(f"cxr-triage results: instances still pending after {args.wait:g} s", file=sys.stderr)
    header = sys.stdout.isatty() if args.header is None else args.header
    print_results(context.db, args.json, args.study, since, context.settings.triage, header)
    return 0


def run(args: argparse.Namespace) -> int:
    from cxr_triage.core.bootstrap import CURRENT, CommandError, run_command

    def body(context: Context) -> int:
        try:
            return _results(args, context)
        except ValueError as exc:  # --since that is not ISO 8601
            raise CommandError(str(exc)) from exc

    return run_command(args, "results", body, database=CURRENT)
