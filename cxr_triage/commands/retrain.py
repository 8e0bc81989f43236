"""``cxr-triage retrain``: run the retraining job once now (``--now``), or list its recent runs.

``--now`` runs one retraining run in this process (``cxr_triage.retrain.retraining.RetrainJob``), whatever ``[retrain]
enabled`` says, its steps logged to standard error and its outcome printed; it waits for nothing if another run
holds the lease (exit 1). SIGTERM or Ctrl-C stops the training and records the run as failed.
"""

from __future__ import annotations

import argparse
import json
import signal
from typing import TYPE_CHECKING, Any

from cxr_triage.core import db
from cxr_triage.core.bootstrap import CURRENT, run_command
from cxr_triage.retrain import retraining
from cxr_triage.retrain import runs as run_records

if TYPE_CHECKING:
    from cxr_triage.core.bootstrap import Context

DONE_STATES = (db.RETRAIN_PROMOTED, db.RETRAIN_REJECTED, db.RETRAIN_SKIPPED)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--now", action="store_true", help="run the retraining job once, now, and print its outcome")
    parser.add_argument("--json", action="store_true", help="JSON instead of text (one object per run)")
    parser.add_argument("--limit", type=int, default=10, help="how many recent runs to list (default 10)")


def _now(args: argparse.Namespace, context: Context) -> int:
    job = retraining.RetrainJob(context.settings, db.session_factory(context.db))

    def stop(signum: int, _frame: Any) -> None:
        job.abort(f"stopped by signal {signum}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        outcome = job.run(retraining.MANUAL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        print(json.dumps({"run_id": outcome.run_id, "state": outcome.state, "reason": outcome.reason,
                          "candidate_id": outcome.candidate_id, "champion_metrics": outcome.champion_metrics,
                          "challenger_metrics": outcome.challenger_metrics}))  # fmt: skip
    else:
        print(outcome.describe())
    return 0 if outcome.state in DONE_STATES else 1


def _list(args: argparse.Namespace, context: Context) -> int:
    now = db.utcnow()
    with db.read_session(context.db) as session:
        summary = run_records.status(session, context.settings, now)
        runs = [run_records.run_json(run) for run in run_records.recent_runs(session, args.limit)]
    if args.json:
        for run in runs:
            print(json.dumps(run))
        return 0
    print(format_schedule(summary))
    if not runs:
        print("no retraining run yet")
    for run in runs:
        print(format_run(run))
    return 0


def format_schedule(summary: dict[str, Any]) -> str:
    """One line: whether the schedule runs, when next, which process leads it, a run in progress."""
    if not summary["enabled"]:
        text = "retraining schedule: off ([retrain] enabled = false)"
    else:
        text = (
            f"retraining schedule: {summary['schedule']!r} ({summary['timezone']}), next run {summary['next_run']}, "
            + (f"run by {summary['scheduler']}" if summary["scheduler"] else "no serve process runs it")
        )
    if summary.get("running"):
        text += f"; a run is in progress ({summary['running']})"
    return text


def format_run(run: dict[str, Any]) -> str:
    counts = ""
    if run["new_images"] is not None:
        counts = f", {run['new_images']} new image(s)"
        if run["replay_images"] is not None:
            counts += f" + {run['replay_images']} replayed, evaluated on {run['eval_images']}"
    step = f" [{run['step']}]" if run["state"] == db.RETRAIN_RUNNING else ""
    return f"run {run['id']} ({run['trigger']}, {run['started_at']}): {run['state']}{step}{counts}" + (
        f": {run['reason']}" if run["reason"] else ""
    )


def run(args: argparse.Namespace) -> int:
    body = _now if args.now else _list
    return run_command(args, "retrain", lambda context: body(args, context), database=CURRENT, service=args.now)
