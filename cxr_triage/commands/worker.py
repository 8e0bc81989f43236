"""``cxr-triage worker``: one worker (``cxr_triage.triage.worker``) alone in this process, for more hosts sharing
one PostgreSQL database; with ``--once`` it works until the queue is empty, sends what is due once
(``cxr_triage.ops.housekeeping``) and exits.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cxr_triage.core import db
from cxr_triage.outputs import srfiles
from cxr_triage.outputs.registry import start_up_checks
from cxr_triage.queue import jobqueue
from cxr_triage.triage.worker import (
    Worker,
    available_cores,
    install_signal_handlers,
    quiet_openmp_threads,
    use_threads,
    worker_layout,
)

if TYPE_CHECKING:
    from cxr_triage.core.bootstrap import Context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument(
        "--model", default=None, metavar="PATH", help="classifier checkpoint (overrides [model] path; default: bundled)"
    )
    parser.add_argument(
        "--once", action="store_true", help="process until the queue is empty, send the reports due, then exit"
    )


def _work(args: argparse.Namespace, context: Context) -> int:
    sessions = db.session_factory(context.db)
    jobqueue.release_dead_local_workers(sessions, context.settings.worker.max_attempts, jobqueue.EARLIER_RUN_DIED)
    srfiles.settle_pending(context.settings.storage.sr_dir, sessions)
    ws = context.settings.worker
    _, threads = worker_layout(1, ws.threads, available_cores(), cuda=False)  # this one process has every core
    use_threads(threads)
    runner = Worker(context.settings, context.db)
    if args.once:  # one-shot use: the queue, then the housekeeping once (forwarding, aggregation)
        from cxr_triage.ops.housekeeping import Housekeeping

        runner.run_until_idle()
        jobqueue.release(runner.sessions, runner.worker_id)
        Housekeeping(context.settings, runner.sessions).run_once()
        return 0
    install_signal_handlers(runner.stop)
    runner.run()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run one worker in this process until SIGTERM/SIGINT (or, with ``--once``, until the queue is empty)."""
    quiet_openmp_threads()
    from cxr_triage.core.bootstrap import SERVICE, run_command

    checks = start_up_checks()
    return run_command(
        args, "worker", lambda context: _work(args, context), database=SERVICE, service=True, checks=checks
    )
