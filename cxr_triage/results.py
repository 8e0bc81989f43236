"""``cxr-triage results``: what the database holds, one line (or JSON object) per received instance.

Keys (GUIDE §5): ``path`` (the spool file), ``sop_instance_uid``, ``status`` (``ok``, ``rejected``, ``error``, or
``queued`` / ``processing`` while pending), ``label``, ``probabilities`` {covid, normal, pneumonia}, ``reason``,
``model_version``, plus ``study_instance_uid``, ``received_at``, ``completed_at``, ``sr_sop_instance_uid`` and
``flagged``, in order of arrival.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cxr_triage import db

STATUS_NAMES = {db.DONE: "ok", db.REFUSED: "rejected", db.FAILED: "error"}
"""Database job states as ``classify`` names them; pending states keep their own names."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--study", default=None, metavar="UID", help="only this Study Instance UID")
    parser.add_argument("--since", default=None, metavar="ISO8601", help="only instances received at or after this")


def parse_since(text: str) -> dt.datetime:
    """ISO 8601 date or date-time; a time without zone is UTC."""
    value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def records(session: Session, study: str | None = None, since: dt.datetime | None = None) -> Iterator[dict[str, Any]]:
    query = select(db.Instance).order_by(db.Instance.received_at, db.Instance.id)
    if study:
        query = query.where(db.Instance.study_instance_uid == study)
    if since:
        query = query.where(db.Instance.received_at >= since)
    for instance in session.scalars(query).yield_per(500):
        prediction = session.scalars(
            select(db.Prediction).where(db.Prediction.instance_id == instance.id).order_by(db.Prediction.id.desc())
        ).first()
        refusal = session.scalars(
            select(db.Refusal).where(db.Refusal.instance_id == instance.id).order_by(db.Refusal.id.desc())
        ).first()
        sr = session.scalars(
            select(db.SRDocument).where(db.SRDocument.instance_id == instance.id).order_by(db.SRDocument.id.desc())
        ).first()
        reason = None
        if instance.status == db.REFUSED and refusal is not None:
            reason = refusal.reason
        elif instance.error:
            reason = instance.error
        elif instance.flagged:
            reason = instance.flag_reason
        yield {
            "path": instance.spool_path,
            "sop_instance_uid": instance.sop_instance_uid,
            "status": STATUS_NAMES.get(instance.status, instance.status),
            "label": prediction.label if prediction else None,
            "probabilities": {k: round(float(v), 6) for k, v in prediction.probabilities.items()}
            if prediction
            else None,
            "reason": reason,
            "model_version": prediction.model_version if prediction else None,
            "study_instance_uid": instance.study_instance_uid,
            "received_at": _iso(instance.received_at),
            "completed_at": _iso(instance.completed_at),
            "sr_sop_instance_uid": sr.sop_instance_uid if sr else None,
            "flagged": bool(instance.flagged),
        }


def format_line(record: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(record)
    fields = [record["received_at"], record["sop_instance_uid"], record["status"]]
    if record["status"] == "ok":
        probs = " ".join(f"{k}={v:.3f}" for k, v in record["probabilities"].items())
        fields += [record["label"], probs, "FLAGGED" if record["flagged"] else ""]
    else:
        fields.append(record["reason"] or "")
    return "\t".join(str(f) for f in fields).rstrip("\t")


def print_results(engine: Engine, as_json: bool, study: str | None, since: dt.datetime | None) -> int:
    count = 0
    with db.read_session(engine) as session:
        for record in records(session, study, since):
            print(format_line(record, as_json))
            count += 1
    sys.stdout.flush()
    return count


def run(args: argparse.Namespace) -> int:
    from cxr_triage.config import ConfigError, load_config
    from cxr_triage.dbcli import upgrade_command

    try:
        config = load_config(args.config)
        since = parse_since(args.since) if args.since else None
    except (ConfigError, ValueError) as exc:
        print(f"cxr-triage results: {exc}", file=sys.stderr)
        return 2
    engine = db.make_engine(config["database"]["url"], create_dirs=False)
    try:
        state = db.schema_state(engine)
        if state != "current":
            print(f"cxr-triage results: the database is {state}; run `{upgrade_command(args.config)}`", file=sys.stderr)
            return 2
        print_results(engine, args.json, args.study, since)
        return 0
    finally:
        engine.dispose()
