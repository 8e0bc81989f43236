"""One start-up for every subcommand: settings, logging, the database, and how a failure ends the command.

A subcommand's ``run(args)`` is ``run_command(args, "results", body, database=CURRENT)``: the settings are
loaded and checked (``cxr_triage.core.settings``), logging is set up once (``configure_logging``), the database is
opened as the command needs it, ``body(context)`` runs, and the engine is disposed. A problem the user can fix
(a bad configuration, a database that does not exist or is behind, one that cannot be read) is printed as one
line, ``cxr-triage COMMAND: what happened and what to do``, with exit status 2.

Database modes:

- ``NONE``: the command needs no database (``classify``, ``send``);
- ``CURRENT``: an existing database at the code's revision, creating nothing (``results``, ``status``,
  ``forward``): a missing SQLite file is reported with its resolved path and the likely cause;
- ``SERVICE``: ``serve`` and ``worker``: an empty database gets the schema, one behind the code is refused with the
  ``db upgrade`` command to run, one ahead (a newer release) is refused;
- ``MIGRATE``: ``db``: the engine only, the SQLite folder created for ``upgrade``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TextIO

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.config import ConfigError
from cxr_triage.core.settings import Settings, load_settings

logger = logging.getLogger(log_name(__name__))

QUIET_LIBRARIES = ("highdicom", "alembic")
"""Loggers held at WARNING unless the level is DEBUG (highdicom logs several INFO lines per SR, Alembic seven on
every start)."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


class DatabaseMode(Enum):
    NONE = "none"
    CURRENT = "current"
    SERVICE = "service"
    MIGRATE = "migrate"


NONE, CURRENT, SERVICE, MIGRATE = DatabaseMode.NONE, DatabaseMode.CURRENT, DatabaseMode.SERVICE, DatabaseMode.MIGRATE


class CommandError(RuntimeError):
    """A problem the user can fix; the message says what happened and what to do."""


@dataclass(frozen=True)
class Context:
    """What a subcommand's body gets: the checked settings and, unless the mode is NONE, the engine."""

    settings: Settings
    engine: Engine | None
    config_path: str | None

    @property
    def db(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("this command was started without a database")
        return self.engine


_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f\x85\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


class EscapingFormatter(logging.Formatter):
    """One record, one line: control characters in a message (values that came off the wire, such as a UID with
    a newline or a NUL) are written escaped, and the lines of a traceback are indented, so that nothing a peer
    sends can forge a log line or make the log binary."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = _CONTROL.sub(_escaped, record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)  # newlines now only come from a traceback or stack
        return _CONTROL_BUT_NEWLINE.sub(_escaped, text).replace("\n", "\n    ")


class PynetdicomConnectionNoise(logging.Filter):
    """pynetdicom's records about a failing connection that the listener's guard (``cxr_triage.dicom.guard``) reports
    itself, with the peer's address: a PDU cut short is not logged again, and an association dropped for its network
    timeout is a WARNING (a peer's doing, not an error of this server)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pynetdicom.dul" and str(record.msg).startswith("The received PDU is shorter than expected"):
            return False
        if record.name == "pynetdicom.association" and record.msg == "Network timeout reached":
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


PYNETDICOM_NOISE = PynetdicomConnectionNoise()


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """The one place logging is set up (every command, and every worker process ``serve`` starts), to standard
    error unless ``stream`` is given."""
    level = level.upper()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if level == "DEBUG" else logging.WARNING)
    for name in ("pynetdicom.dul", "pynetdicom.association"):
        if level == "DEBUG":
            logging.getLogger(name).removeFilter(PYNETDICOM_NOISE)
        else:
            logging.getLogger(name).addFilter(PYNETDICOM_NOISE)


def upgrade_command(config_path: str | None) -> str:
    """The command line a user runs to bring the database up to date."""
    return "cxr-triage db upgrade" + (f" --config {config_path}" if config_path else "")


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


def _checked(engine: Engine, config_path: str | None, mode: DatabaseMode) -> None:
    missing = db.missing_sqlite_file(engine)
    if missing is not None and mode is CURRENT:
        raise CommandError(missing_database_message(missing, config_path))
    try:
        state = db.schema_state(engine)
    except SQLAlchemyError as exc:
        raise CommandError(unreadable(engine, exc)) from exc
    if state in ("missing", "empty") and mode is SERVICE:
        logger.info("database %s has no tables: creating the schema (migrations to head)", db.describe_url(engine))
        db.upgrade(engine)
    elif state == "ahead":
        raise CommandError(
            f"the database {db.describe_url(engine)} is at revision {db.current_revision(engine)}, which this "
            "code does not know: it was upgraded by a newer cxr-triage"
        )
    elif state != "current" and not (state in ("missing", "empty") and mode is SERVICE):
        raise CommandError(
            f"the database {db.describe_url(engine)} is {state} (revision {db.current_revision(engine)}, this "
            f"code's {db.head_revision(engine)}): run `{upgrade_command(config_path)}` first"
        )


def open_database(settings: Settings, mode: DatabaseMode, config_path: str | None = None) -> Engine:
    """An engine for ``mode`` (see the module docstring); CommandError when the database is not usable."""
    engine = db.make_engine(settings.database.url, echo=settings.database.echo, create_dirs=mode in (SERVICE, MIGRATE))
    if mode is MIGRATE:
        return engine
    try:
        _checked(engine, config_path, mode)
    except BaseException:
        engine.dispose()
        raise
    return engine


def run_command(
    args: argparse.Namespace,
    name: str,
    body: Callable[[Context], int],
    database: DatabaseMode = NONE,
    service: bool = False,
    checks: Sequence[Callable[[Settings], None]] = (),
) -> int:
    """Start ``cxr-triage NAME`` (module docstring) and return its exit status.

    ``service``: the log level defaults to ``[logging] level`` (serve, worker) instead of WARNING. ``checks``: the
    command's start-up checks of its settings (the outputs' own, ``cxr_triage.outputs.registry.start_up_checks``);
    a ``ConfigError`` from one stops the command like a bad configuration file.
    """
    config_path = getattr(args, "config", None)
    try:
        settings = load_settings(config_path)
        if getattr(args, "model", None) and name in ("serve", "worker"):
            settings = settings.with_values(model={"path": str(Path(args.model).resolve())})
        for check in checks:
            check(settings)
    except ConfigError as exc:
        print(f"cxr-triage {name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(getattr(args, "log_level", None) or (settings.logging.level if service else "WARNING"))
    engine = None
    try:
        if database is not NONE:
            engine = open_database(settings, database, config_path)
        return body(Context(settings, engine, config_path))
    except CommandError as exc:
        logger.debug("%s: %s", name, exc)
        print(f"cxr-triage {name}: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        if engine is None:
            raise
        logger.debug("%s failed", name, exc_info=True)
        print(f"cxr-triage {name}: {unreadable(engine, exc)}", file=sys.stderr)
        return 2
    finally:
        if engine is not None:
            engine.dispose()
