"""``cxr-triage db``: apply the schema migrations (``db upgrade``) or show the database's revision (``db current``).

For the default SQLite URL, ``db upgrade`` creates the file and its parent folders. ``serve`` refuses to start on
a database behind the code's revision and names this command.
"""

from __future__ import annotations

import argparse
import logging

from cxr_triage.core import db
from cxr_triage.core.bootstrap import MIGRATE, CommandError, Context, run_command

logger = logging.getLogger("cxr_triage.dbcli")  # its name before it was commands.db


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("upgrade", "current"), help="upgrade: apply migrations; current: show")
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--revision", default="head", help="target revision for upgrade (default: head)")


def _db(args: argparse.Namespace, context: Context) -> int:
    engine = context.db
    try:
        if args.action == "upgrade":
            before = db.current_revision(engine)
            db.upgrade(engine, args.revision)
            print(f"{db.describe_url(engine)}: {before or 'empty'} -> {db.current_revision(engine)}")
            return 0
        state = db.schema_state(engine)
        current, head = db.current_revision(engine), db.head_revision(engine)
        print(f"{db.describe_url(engine)}: revision {current} (code: {head}; {state})")
        return 0 if state == "current" else 1
    except Exception as exc:
        logger.debug("db %s failed", args.action, exc_info=True)
        raise CommandError(f"{args.action}: {type(exc).__name__}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    return run_command(args, "db", lambda context: _db(args, context), database=MIGRATE)
