"""``cxr-triage serve``: the DICOM listener, ``[worker] processes`` worker processes and study aggregation.

Start-up order: configuration; database (a database with no tables at all is created by running the
migrations; one behind the code's revision is refused with the ``db upgrade`` command to run); spool recovery
(incomplete temporaries removed, spool files without a database row enqueued, jobs held by dead local workers
released); then the listener and the workers (multiprocessing, spawn). SIGTERM or SIGINT: stop accepting
associations, let associations in progress finish, ask the workers to stop (each finishes or releases its
claimed jobs), and exit.

Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import sys
import threading
import time
from collections.abc import Mapping
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from cxr_triage import db, listener, spool, worker

logger = logging.getLogger(__name__)

WORKER_STOP_TIMEOUT = 60.0
"""Seconds a worker process gets to finish its batch after SIGTERM before it is killed."""
HOUSEKEEPING_INTERVAL = 5.0
"""Seconds between study aggregation rounds in the server process."""


QUIET_LIBRARIES = ("highdicom", "alembic")
"""Loggers held at WARNING unless ``[logging] level`` is DEBUG (highdicom logs several INFO lines per SR, Alembic
seven on every start)."""


def apply_log_level(level: str) -> None:
    """Set the root logger's level, and keep chatty libraries at WARNING unless the level is DEBUG."""
    level = level.upper()
    logging.getLogger().setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if level == "DEBUG" else logging.WARNING)


class StartupError(RuntimeError):
    """The server cannot start; the message says what to do."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="configuration file (TOML); default: built-in defaults")
    parser.add_argument(
        "--model", default=None, metavar="PATH", help="classifier checkpoint (overrides [model] path; default: bundled)"
    )


def _plain(config: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {section: dict(values) for section, values in config.items()}


def open_database(config: Mapping[str, Mapping[str, Any]], config_path: str | None) -> Engine:
    """The engine, with the schema checked: created when the database is empty, refused when behind."""
    from cxr_triage.dbcli import upgrade_command

    engine = db.make_engine(config["database"]["url"], echo=bool(config["database"]["echo"]))
    try:
        state = db.schema_state(engine)
    except Exception as exc:
        engine.dispose()
        raise StartupError(f"cannot open the database {config['database']['url']!r}: {exc}") from exc
    if state in ("missing", "empty"):
        logger.warning("database %s has no tables: creating the schema (migrations to head)", db.describe_url(engine))
        db.upgrade(engine)
    elif state == "behind":
        engine.dispose()
        raise StartupError(
            f"the database {db.describe_url(engine)} is at revision {db.current_revision(engine)}, behind this "
            f"code's {db.head_revision(engine)}: run `{upgrade_command(config_path)}` first"
        )
    elif state == "ahead":
        engine.dispose()
        raise StartupError(
            f"the database {db.describe_url(engine)} is at revision {db.current_revision(engine)}, which this "
            "code does not know: it was upgraded by a newer cxr-triage"
        )
    return engine


def recover(config: Mapping[str, Mapping[str, Any]], engine: Engine) -> None:
    """Spool and queue recovery after a crash (safe to run on every start)."""
    sessions = db.session_factory(engine)
    spool_dir = config["storage"]["spool_dir"]
    spool.remove_stale_temporaries(spool_dir)
    recovered = listener.record_orphans(spool_dir, sessions)
    released = worker.release_dead_local_workers(sessions)
    if recovered or released:
        logger.warning("recovery: %d spool file(s) enqueued, %d job(s) of dead workers released", recovered, released)


def warn_if_no_model(config: Mapping[str, Mapping[str, Any]]) -> None:
    from cxr_triage.checkpoint import CheckpointError, resolve_model_path

    try:
        resolve_model_path(config["model"]["path"] or None)
    except CheckpointError as exc:
        logger.warning("*" * 78)
        logger.warning("NO MODEL: instances will be received and queued, but not classified. %s", exc)
        logger.warning("*" * 78)


class Server:
    """Listener + worker processes + housekeeping; ``serve_forever`` returns after ``stop`` is set."""

    def __init__(self, config: Mapping[str, Mapping[str, Any]], engine: Engine, log_level: str = "INFO") -> None:
        self.config = _plain(config)
        self.engine = engine
        self.log_level = log_level
        self.stop = threading.Event()
        self._mp = multiprocessing.get_context("spawn")
        self.wake = self._mp.Event()
        """Set by the listener when it has queued an instance; wakes idle worker processes."""
        self.listener = listener.Listener(
            self.config["listener"], listener.make_receiver(self.config, engine, on_queued=self.wake.set)
        )
        self.processes: list[BaseProcess] = []

    def _start_worker(self, index: int) -> BaseProcess:
        process = self._mp.Process(
            target=worker.worker_process_main,
            args=(self.config, self.log_level, self.wake),
            name=f"cxr-worker-{index}",
            daemon=False,
        )
        process.start()
        logger.info("worker process %s started (pid %s)", process.name, process.pid)
        return process

    def start(self) -> None:
        self.listener.start()
        for index in range(int(self.config["worker"]["processes"])):
            self.processes.append(self._start_worker(index))
        if not self.processes:
            logger.info("[worker] processes = 0: no workers here; run `cxr-triage worker` to classify")

    def _watch_workers(self) -> None:
        for index, process in enumerate(self.processes):
            if process.is_alive() or self.stop.is_set():
                continue
            logger.error(
                "worker process %s (pid %s) exited with %s; restarting", process.name, process.pid, process.exitcode
            )
            worker.release_dead_local_workers(db.session_factory(self.engine))
            self.processes[index] = self._start_worker(index)

    def serve_forever(self) -> None:
        sessions = db.session_factory(self.engine)
        quiet = float(self.config["worker"]["study_quiet_seconds"])
        last = 0.0
        while not self.stop.is_set():
            self._watch_workers()
            if time.monotonic() - last >= HOUSEKEEPING_INTERVAL:
                last = time.monotonic()
                try:
                    worker.aggregate_studies(sessions, quiet)
                except Exception:
                    logger.exception("study aggregation failed")
            # Not stop.wait(): the signal handler sets stop, and Event.set() from a handler deadlocks if the
            # handler interrupts this thread while it holds the event's lock inside wait().
            time.sleep(0.5)

    def shutdown(self) -> None:
        """Stop accepting associations, then stop the workers (they finish or release their jobs)."""
        logger.info("shutting down: no new associations")
        self.listener.stop()
        for process in self.processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker stops after its current batch
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("worker process %s did not stop in time; killing it", process.name)
                process.kill()
                process.join(5)
        worker.release_dead_local_workers(db.session_factory(self.engine))
        logger.info("stopped")


def run(args: argparse.Namespace) -> int:
    from cxr_triage.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        if getattr(args, "model", None):
            config = config.with_values(model={"path": str(Path(args.model).resolve())})
    except ConfigError as exc:
        print(f"cxr-triage serve: {exc}", file=sys.stderr)
        return 2
    level = (getattr(args, "log_level", None) or config["logging"]["level"]).upper()
    apply_log_level(level)
    try:
        engine = open_database(config.values, args.config)
        recover(config.values, engine)
    except StartupError as exc:
        logger.error("%s", exc)
        print(f"cxr-triage serve: {exc}", file=sys.stderr)
        return 2
    warn_if_no_model(config.values)
    Path(config["storage"]["sr_dir"]).mkdir(parents=True, exist_ok=True)
    server = Server(config.values, engine, level)

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d received", signum)
        server.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except (OSError, ValueError) as exc:
        logger.exception("cannot start the listener")
        print(f"cxr-triage serve: cannot start the listener: {exc}", file=sys.stderr)
        server.shutdown()
        engine.dispose()
        return 2
    try:
        server.serve_forever()
    finally:
        server.shutdown()
        engine.dispose()
    return 0
