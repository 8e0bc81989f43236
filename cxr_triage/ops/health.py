"""What ``/healthz`` checks, and the deadline every operations read of the database runs under.

Four checks, each passing, failing or (when it needs an unreachable database) not checked:

- **database**: ``SELECT 1`` and the queue counts answer within ``DATABASE_TIMEOUT`` seconds (an SQLite file that
  has disappeared fails, although connections opened before may still read its deleted inode);
- **model**: a worker has loaded the configured checkpoint. Only the workers load models, and they may run on
  other hosts, so this is read from the ``model_versions`` rows a worker writes when it loads a file
  (``cxr_triage.ml.registry``): the checkpoint's sha256 must be among them. Where the checkpoint is not on this host
  (the web app on a host of its own), any registered model passes and the detail says so;
- **spool**: free space on the spool's file system is at least ``[storage] min_free_mb`` (below it the listener
  answers 0xA700);
- **queue**: the oldest queued instance has waited at most ``[web] max_queue_age_seconds``.

The report names no patient, study or instance: only counts, ages, sizes and the model's version and sha256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import SQLAlchemyError

from cxr_triage import BUNDLED_MODEL
from cxr_triage.core import db
from cxr_triage.core.settings import Settings
from cxr_triage.ops import status
from cxr_triage.queue import spool

T = TypeVar("T")

DATABASE_TIMEOUT = 5.0
"""Seconds an operations read of the database may take before the probe reports the database as not answering."""
READ_SLOTS = 2
"""Reads that may wait on a hung database at once; the next ones fail at once instead of adding threads."""


class DatabaseUnavailable(RuntimeError):
    """The database cannot be read now (the message says why, without SQL or values)."""


class TimedReader:
    """Runs reads of the database in threads of their own and waits for each at most ``timeout`` seconds.

    A database that hangs (a lock held for long, a host that drops packets) would otherwise hang the probe with
    it; here the probe fails after ``timeout`` while the read goes on in the background, and at most ``slots``
    such reads are left waiting.
    """

    def __init__(self, timeout: float = DATABASE_TIMEOUT, slots: int = READ_SLOTS) -> None:
        if timeout <= 0 or slots < 1:
            raise ValueError("timeout must be > 0 and slots >= 1")
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(slots)

    def __call__(self, read: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.timeout
        if not self._slots.acquire(timeout=self.timeout):
            raise DatabaseUnavailable(f"earlier reads of the database have not returned after {self.timeout:g} s")
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                outcome["value"] = read()
            except BaseException as exc:  # handed to the caller, re-raised there
                outcome["error"] = exc
            finally:
                self._slots.release()
                done.set()

        threading.Thread(target=run, name="cxr-ops-read", daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise DatabaseUnavailable(f"no answer from the database within {self.timeout:g} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


def ensure_database_file(engine: Engine) -> None:
    """Raise ``DatabaseUnavailable`` when ``engine``'s SQLite file does not exist (any more)."""
    if db.missing_sqlite_file(engine) is not None:
        raise DatabaseUnavailable("the SQLite database file does not exist")


def database_error(exc: BaseException) -> str:
    """One line saying why the database could not be read: the driver's message, without the SQL."""
    if isinstance(exc, DatabaseUnavailable):
        return str(exc)
    original = getattr(exc, "orig", None) or exc
    message = str(original).strip()
    return f"{type(original).__name__}: {message.splitlines()[0] if message else 'no message'}"[:300]


DATABASE_ERRORS = (SQLAlchemyError, DatabaseUnavailable)
"""What a read of an unreachable, hung or broken database raises."""


@dataclass(frozen=True)
class Check:
    """One check of ``/healthz``: ``ok`` is None when it was not checked (it needs the database)."""

    ok: bool | None
    detail: str


@dataclass(frozen=True)
class HealthReport:
    """The checks by name; healthy when every one passed."""

    checks: dict[str, Check]

    @property
    def healthy(self) -> bool:
        return all(check.ok for check in self.checks.values())

    @property
    def failing(self) -> list[str]:
        return [name for name, check in self.checks.items() if check.ok is False]

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy else "failing",
            "failing": self.failing,
            "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in self.checks.items()},
        }


@dataclass(frozen=True)
class _Reading:
    """What the checks read from the database."""

    counts: status.DatabaseCounts
    configured: tuple[str, dt.datetime] | None
    """Version and registration time of the configured checkpoint's ``model_versions`` row, if it has one."""
    elapsed_ms: float


class HealthChecker:
    """The checks of one configuration over one database."""

    def __init__(self, settings: Settings, engine: Engine, reader: TimedReader | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.reader = reader or TimedReader()
        self._sha_cache: tuple[tuple[str, int, int], str] | None = None

    def check(self, now: dt.datetime | None = None) -> HealthReport:
        moment = now or db.utcnow()
        model_path = Path(self.settings.model.path) if self.settings.model.path else BUNDLED_MODEL
        sha256 = self._checkpoint_sha256(model_path)
        try:
            reading = self.reader(lambda: self._read(moment, sha256))
        except DATABASE_ERRORS as exc:
            unchecked = Check(None, "not checked: the database cannot be read")
            database = Check(False, database_error(exc))
            return HealthReport({"database": database, "model": unchecked, "spool": self._spool(), "queue": unchecked})
        return HealthReport(
            {
                "database": Check(True, f"answered in {reading.elapsed_ms:.0f} ms"),
                "model": self._model(reading, sha256),
                "spool": self._spool(),
                "queue": self._queue(reading, moment),
            }
        )

    def _read(self, now: dt.datetime, sha256: str | None) -> _Reading:
        started = time.perf_counter()
        ensure_database_file(self.engine)
        with db.read_session(self.engine) as session:
            session.execute(text("SELECT 1"))
            row = None
            if sha256 is not None:
                row = session.execute(
                    select(db.ModelVersion.version, db.ModelVersion.registered_at).where(
                        db.ModelVersion.sha256 == sha256
                    )
                ).first()
            configured = (str(row.version), row.registered_at) if row is not None else None
        counts = status.read_counts(self.engine, now)
        return _Reading(counts, configured, (time.perf_counter() - started) * 1000.0)

    def _checkpoint_sha256(self, path: Path) -> str | None:
        """The checkpoint's sha256 (as the registry records it), or None when it is not a file on this host."""
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if self._sha_cache is not None and self._sha_cache[0] == key:
            return self._sha_cache[1]
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            return None
        self._sha_cache = (key, digest.hexdigest())
        return self._sha_cache[1]

    @staticmethod
    def _model(reading: _Reading, sha256: str | None) -> Check:
        if sha256 is not None:
            if reading.configured is None:
                return Check(
                    False,
                    f"no worker has loaded the configured checkpoint (sha256 {sha256[:12]}): are the workers "
                    "running? Their log says why a model cannot be loaded",
                )
            version, registered_at = reading.configured
            return Check(True, f"{version} (sha256 {sha256[:12]}) loaded by a worker since {registered_at.isoformat()}")
        champion = reading.counts.champion
        if champion is None:
            return Check(False, "no checkpoint on this host and no champion model registered by a worker")
        return Check(
            True,
            f"the checkpoint is not on this host; the workers run the champion {champion.version} (sha256 "
            f"{champion.sha256[:12]}, registered {champion.registered_at.isoformat()})",
        )

    def _spool(self) -> Check:
        reserve = self.settings.storage.min_free_mb
        try:
            free = spool.free_mb(self.settings.storage.spool_dir)
        except OSError as exc:
            return Check(False, f"cannot read the spool's free space: {exc.strerror or exc}")
        if free < reserve:
            return Check(
                False,
                f"{free:.0f} MiB free, below the reserve of {reserve:g} MiB: the listener answers 0xA700 (out of "
                "resources)",
            )
        return Check(True, f"{free:.0f} MiB free (reserve {reserve:g} MiB)")

    def _queue(self, reading: _Reading, now: dt.datetime) -> Check:
        limit = self.settings.web.max_queue_age_seconds
        queued = int(reading.counts.by_state.get(db.QUEUED, 0))
        oldest = reading.counts.oldest_queued
        if oldest is None:
            return Check(True, "nothing queued")
        waited = (now - oldest).total_seconds()
        if waited > limit:
            return Check(
                False,
                f"the oldest of {queued} queued instance(s) has waited {waited:.0f} s (limit {limit:g} s): are the "
                "workers running, and do they have a model?",
            )
        return Check(True, f"{queued} queued, the oldest for {waited:.0f} s (limit {limit:g} s)")
