"""``cxr-triage db``: apply the schema migrations (``db upgrade``) or show the database's revision (``db current``).

For the default SQLite URL, ``db upgrade`` creates the file and its parent folders. The server refuses to start
on a database behind the code's revision and names this command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sqlalchemy import Engine

from cxr_triage import db

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("upgrade", "current"), help="upgrade: apply migrations; current: show")
    parser.add_argument("--config", default=None, help="configuration file (TOML)")
    parser.add_argument("--revision", default="head", help="target revision for upgrade (default: head)")


def upgrade_command(config_path: str | None) -> str:
    """The command line a user runs to bring the database up to date."""
    return "cxr-triage db upgrade" + (f" --config {config_path}" if config_path else "")


class DatabaseNotReady(RuntimeError):
    """The database a read-side command needs does not exist, cannot be read or is not at the code's revision;
    the message says what to run."""


def unreadable(engine: Engine, exc: Exception) -> str:
    """One line saying that ``engine``'s database cannot be read, with the driver's own first line of why."""
    detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return f"cannot read the database {db.describe_url(engine)}: {detail}"


def missing_database_message(path: Path, config_path: str | None) -> str:
    """Why an SQLite file may be missing, and what to do: a relative path resolves against the current folder."""
    where = path.resolve()
    if path.is_absolute():
        return (
            f"the database {where} does not exist: no server has run with this configuration yet (`cxr-triage "
            f"serve` creates it), or the configuration names another file; a new one: `{upgrade_command(config_path)}`"
        )
    return (
        f"the database {where} does not exist. The configured path {path} is relative, so it is resolved against "
        f"the current folder ({Path.cwd()}): run this command in the folder `cxr-triage serve` runs in, or give the "
        "server's configuration an absolute [database] url and pass it with --config. (A new, empty database "
        f"would be made by `{upgrade_command(config_path)}`.)"
    )


def open_current(url: str, config_path: str | None) -> Engine:
    """An engine on an existing database at the code's revision, creating nothing (for ``results``, ``forward``,
    ``status``); :class:`DatabaseNotReady` otherwise."""
    from sqlalchemy.exc import SQLAlchemyError

    engine = db.make_engine(url, create_dirs=False)
    try:
        missing = db.missing_sqlite_file(engine)
        if missing is not None:
            raise DatabaseNotReady(missing_database_message(missing, config_path))
        try:
            state = db.schema_state(engine)
        except SQLAlchemyError as exc:
            raise DatabaseNotReady(unreadable(engine, exc)) from exc
        if state != "current":
            raise DatabaseNotReady(
                f"the database {db.describe_url(engine)} is {state}; run `{upgrade_command(config_path)}`"
            )
    except DatabaseNotReady:
        engine.dispose()
        raise
    return engine


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
