"""What the retraining runs did, for people: ``retrain_runs`` rows as JSON (``run_json``, ``recent_runs``) and
retraining's part of ``cxr-triage status`` and ``cxr-triage retrain`` (``status``: the schedule, which process leads
it, a run in progress, the last run; ``status_problems``). Reads only.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_triage.core import db, schedlock
from cxr_triage.core.settings import Settings
from cxr_triage.retrain.retraining import RUN_LEASE
from cxr_triage.retrain.scheduler import SCHEDULER_LEASE


def run_json(run: db.RetrainRun) -> dict[str, Any]:
    """A ``retrain_runs`` row as plain JSON values."""
    moments = ("started_at", "updated_at", "finished_at")
    out: dict[str, Any] = {}
    for column in db.RetrainRun.__table__.columns:
        value = getattr(run, column.name)
        out[column.name] = value.isoformat() if column.name in moments and value is not None else value
    return out


def recent_runs(session: Session, limit: int = 10) -> list[db.RetrainRun]:
    return list(session.scalars(select(db.RetrainRun).order_by(db.RetrainRun.id.desc()).limit(limit)))


def status(session: Session, settings: Settings, now: dt.datetime) -> dict[str, Any]:
    """Retraining for ``cxr-triage status``: the schedule, its leader, the last run and a run in progress."""
    r = settings.retrain
    next_run = r.trigger().get_next_fire_time(None, now) if r.enabled else None
    leader = schedlock.read(session, SCHEDULER_LEASE)
    running = schedlock.read(session, RUN_LEASE)
    runs = recent_runs(session, 1)
    return {
        "enabled": r.enabled,
        "schedule": r.schedule,
        "timezone": r.timezone or "local",
        "next_run": next_run.isoformat() if next_run is not None else None,
        "scheduler": leader.holder if leader is not None and leader.held(now) else None,
        "running": running.holder if running is not None and running.held(now) else None,
        "last_run": run_json(runs[0]) if runs else None,
    }


def status_problems(retraining: dict[str, Any]) -> list[str]:
    """The conditions of retraining that need someone's attention."""
    problems = []
    last = retraining.get("last_run")
    if last and last["state"] == db.RETRAIN_FAILED:
        log = (last.get("details") or {}).get("log")
        problems.append(
            f"retraining run {last['id']} failed: {last['reason']}"
            + (f" (log: {log})" if log else "")
            + "; the champion is unchanged"
        )
    if last and last["state"] == db.RETRAIN_RUNNING and not retraining.get("running"):
        problems.append(
            f"retraining run {last['id']} is marked running but no process holds its lease (it died); the next run "
            "records it as failed"
        )
    if retraining["enabled"] and not retraining.get("scheduler"):
        problems.append("[retrain] enabled but no `serve` process runs the retraining schedule")
    return problems
