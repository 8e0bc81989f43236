"""``cxr-triage serve``: the service itself (``cxr_triage.ops.server``): settings and their start-up checks, the
database (an empty one gets the schema), recovery, then the listener, the worker processes and the housekeeping
until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

from cxr_triage import log_name
from cxr_triage.core.bootstrap import SERVICE, CommandError, Context, run_command
from cxr_triage.ops.server import Server, recover, warn_if_no_model
from cxr_triage.outputs.registry import start_up_checks

logger = logging.getLogger(log_name(Server.__module__))
"""The server module's logger: the command's lines name what they report on."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML); default: built-in defaults")
    parser.add_argument(
        "--model", default=None, metavar="PATH", help="classifier checkpoint (overrides [model] path; default: bundled)"
    )


def _serve(args: argparse.Namespace, context: Context) -> int:
    settings, engine = context.settings, context.db
    recover(settings, engine)
    warn_if_no_model(settings)
    settings.storage.sr_dir.mkdir(parents=True, exist_ok=True)
    level = (getattr(args, "log_level", None) or settings.logging.level).upper()
    server = Server(settings, engine, level)

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d received", signum)
        server.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except (OSError, ValueError) as exc:
        logger.exception("cannot start the listener")
        server.shutdown()
        raise CommandError(f"cannot start the listener: {exc}") from exc
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    return 0


def run(args: argparse.Namespace) -> int:
    checks = start_up_checks()
    return run_command(
        args, "serve", lambda context: _serve(args, context), database=SERVICE, service=True, checks=checks
    )
