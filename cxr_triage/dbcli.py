"""``cxr-triage db``: apply the schema migrations (``db upgrade``) or show the database's revision (``db current``).

For the default SQLite URL, ``db upgrade`` creates the file and its parent folders. The server refuses to start
on a database behind the code's revision and names this command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cxr_triage import db

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("upgrade", "current"), help="upgrade: apply migrations; current: show")
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--revision", default="head", help="target revision for upgrade (default: head)")


def upgrade_command(config_path: str | None) -> str:
    """The command line a user runs to bring the database up to date."""
    return "cxr-triage db upgrade" + (f" --config {config_path}" if config_path else "")


def run(args: argparse.Namespace) -> int:
    from cxr_triage.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cxr-triage db: {exc}", file=sys.stderr)
        return 2
    engine = db.make_engine(config["database"]["url"], create_dirs=args.action == "upgrade")
    try:
        if args.action == "upgrade":
            before = db.current_revision(engine)
            db.upgrade(engine, args.revision)
            after = db.current_revision(engine)
            print(f"{db.describe_url(engine)}: {before or 'empty'} -> {after}")
            return 0
        state = db.schema_state(engine)
        current, head = db.current_revision(engine), db.head_revision(engine)
        print(f"{db.describe_url(engine)}: revision {current} (code: {head}; {state})")
        return 0 if state == "current" else 1
    except Exception as exc:
        logger.debug("db %s failed", args.action, exc_info=True)
        print(f"cxr-triage db {args.action}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
