"""``cxr-triage status``: the pipeline's health at a glance, for the PACS team and for monitoring probes.

Reads the database and the spool (never loads torch or the model): instances by state and the age of the oldest
queued one, jobs whose worker vanished (lease expired), failures of the last 24 hours, SR forwards by state (and
every output of ``cxr_triage.outputs.registry`` by state, under ``outboxes``), the
spool's free space against its reserve, the model configured and the champion the workers run, and retraining
(the schedule, which process runs it, the last run with its outcome and reason, a run in progress with its step).
Each condition that needs someone's attention is listed as a problem, with what to do.

Exit status, as monitoring plugins expect: 0 nothing needs attention, 1 at least one problem, 2 the status cannot
be read (no configuration, no database).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, select

from cxr_triage import BUNDLED_MODEL
from cxr_triage.core import db
from cxr_triage.core.settings import Settings
from cxr_triage.outputs.registry import OUTPUTS
from cxr_triage.queue import spool
from cxr_triage.retrain import runs

if TYPE_CHECKING:
    pass

FAILURE_WINDOW = dt.timedelta(hours=24)
"""How far back failed instances count as a problem."""


@dataclass(frozen=True)
class DatabaseCounts:
    """What :func:`collect` reads from the database, in one read session."""

    by_state: dict[str, int]
    oldest_queued: dt.datetime | None
    expired: int | None
    recent_failures: int | None
    forwards: dict[str, int]
    champion: Any
    last_precision: str | None
    outboxes: dict[str, dict[str, int]]
    """Every output's rows by state, by its kind (``cxr_triage.outputs.registry``)."""


def read_counts(engine: Engine, now: dt.datetime) -> DatabaseCounts:
    """Instances by state, the oldest queued one, expired leases, recent failures, forwards by state, the
    champion the workers run and the precision of the last prediction."""
    with db.read_session(engine) as session:
        by_state = dict(session.execute(select(db.Instance.status, func.count()).group_by(db.Instance.status)).all())
        oldest_queued = session.scalar(select(func.min(db.Instance.received_at)).where(db.Instance.status == db.QUEUED))
        expired = session.scalar(
            select(func.count()).where(db.Instance.status == db.PROCESSING, db.Instance.lease_until < now)
        )
        recent_failures = session.scalar(
            select(func.count()).where(
                db.Instance.status == db.FAILED, db.Instance.completed_at >= now - FAILURE_WINDOW
            )
        )
        forwards = dict(session.execute(select(db.Forward.state, func.count()).group_by(db.Forward.state)).all())
        champion = session.execute(
            select(db.ModelVersion.version, db.ModelVersion.sha256, db.ModelVersion.registered_at).where(
                db.ModelVersion.state == db.MODEL_CHAMPION
            )
        ).first()
        last_precision = session.scalar(
            select(db.PredictionRecord.precision).order_by(db.PredictionRecord.id.desc()).limit(1)
        )
        outboxes = {
            output.kind: dict(
                session.execute(select(output.table.state, func.count()).group_by(output.table.state)).all()
            )
            for output in OUTPUTS
        }
    return DatabaseCounts(
        by_state, oldest_queued, expired, recent_failures, forwards, champion, last_precision, outboxes
    )


def _problems(
    counts: DatabaseCounts,
    model_path: Path,
    model_present: bool,
    free: float,
    reserve: float,
    queued_for: float | None,
    max_queue_age: float,
) -> list[str]:
    """The conditions that need someone's attention, each with what to do."""
    problems = []
    if not model_present:
        problems.append(
            f"no model at {model_path}: images are received and queued but not classified. The bundled model ships "
            "with the repository (cxr_triage/models/cae_lstm.pt): reinstall from a complete clone, or train one "
            "(`python -m training oneshot`, docs/TRAINING.md) and set [model] path"
        )
    if free < reserve:
        problems.append(
            f"spool below its reserve ({free:.0f} MiB free, reserve {reserve:.0f} MiB): the listener answers "
            "0xA700 and the PACS retries later; free space or lower [storage] spool_retention_days"
        )
    elif free < 2 * reserve:
        problems.append(f"spool nearly full ({free:.0f} MiB free, reserve {reserve:.0f} MiB)")
    if queued_for is not None and queued_for > max_queue_age:
        problems.append(
            f"the oldest queued instance has waited {queued_for:.0f} s (more than {max_queue_age:g} s): are the "
            "workers running, and do they have a model?"
        )
    if counts.expired:
        problems.append(
            f"{counts.expired} job(s) held by a worker whose lease expired (worker died?); they are retried"
        )
    if counts.recent_failures:
        problems.append(
            f"{counts.recent_failures} instance(s) failed in the last 24 h after every attempt: `cxr-triage results` "
            "gives the reasons"
        )
    dead = int(counts.forwards.get(db.FORWARD_DEAD, 0))
    if dead:
        problems.append(f"{dead} SR forward(s) dead-lettered: fix the destination, then `cxr-triage forward --retry`")
    dead = int(counts.outboxes.get("dicomweb", {}).get(db.FORWARD_DEAD, 0))
    if dead:
        problems.append(
            f"{dead} SR STOW-RS deliveries dead-lettered: fix the [dicomweb] destination, then "
            "`cxr-triage forward --retry`"
        )
    return problems


def collect(engine: Engine, settings: Settings, max_queue_age: float, now: dt.datetime | None = None) -> dict[str, Any]:
    """The status as a plain dict (the ``--json`` output); ``problems`` lists what needs attention."""
    now = now or db.utcnow()
    counts = read_counts(engine, now)
    oldest_queued = counts.oldest_queued
    queued_for = (now - oldest_queued).total_seconds() if oldest_queued is not None else None
    storage = settings.storage
    free = spool.free_mb(storage.spool_dir)
    reserve = storage.min_free_mb
    configured = settings.model.path
    model_path = Path(configured) if configured else BUNDLED_MODEL
    model_present = model_path.is_file()

    problems = _problems(counts, model_path, model_present, free, reserve, queued_for, max_queue_age)
    with db.read_session(engine) as session:
        retrain = runs.status(session, settings, now)
    problems += runs.status_problems(retrain)
    by_state, forwards, champion = counts.by_state, counts.forwards, counts.champion
    return {
        "instances": {state: int(by_state.get(state, 0)) for state in (db.QUEUED, db.PROCESSING, *db.TERMINAL_STATES)},
        "oldest_queued_seconds": round(queued_for, 1) if queued_for is not None else None,
        "expired_leases": int(counts.expired or 0),
        "failed_last_24h": int(counts.recent_failures or 0),
        "forwards": {
            state: int(forwards.get(state, 0)) for state in (db.FORWARD_PENDING, db.FORWARD_SENT, db.FORWARD_DEAD)
        },
        "outboxes": {
            kind: {state: int(n) for state, n in sorted(rows.items())} for kind, rows in counts.outboxes.items()
        },
        "spool": {"path": str(Path(storage.spool_dir).resolve()), "free_mb": round(free), "reserve_mb": reserve},
        "model": {
            "path": str(model_path),
            "present": model_present,
            "champion": {
                "version": champion.version,
                "sha256": champion.sha256,
                "registered_at": champion.registered_at.isoformat(),
            }
            if champion is not None
            else None,
            "precision": {"configured": settings.model.precision, "last_used": counts.last_precision},
        },
        "retraining": retrain,
        "problems": problems,
    }
