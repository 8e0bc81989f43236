"""Named leases in the database: a lock that one process holds across processes and hosts, and that ends by itself
when its holder dies.

A lease is a ``leases`` row: ``holder`` and ``expires_at``. ``Lease.acquire`` takes it when it is free, expired or
already ours, in one conditional ``UPDATE`` (PostgreSQL's row lock makes a second contender wait and then re-read
the row, so it sees the first one's holder and takes nothing; SQLite's ``BEGIN IMMEDIATE`` serialises writers
anyway). The holder renews it well before it expires (``Keeper``: every third of its length); a holder that died
stops renewing and the lease is free again ``seconds`` after its last renewal. Times are the hosts' clocks (as the
job queue's leases are): hosts that share a database must keep their clocks in step (NTP).

Holder ids are ``host:pid:random``, so a status page can say who holds a lease and a restarted process on the same
host and pid never counts as the old holder.

``crontab_trigger`` turns a standard five-field crontab line into an APScheduler 3 ``CronTrigger``. APScheduler
numbers the days of the week from Monday = 0, crontab from Sunday = 0 (and 7): its own ``from_crontab`` would run
``0 2 * * 0`` on Mondays, so the day-of-week field is translated to day names first.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db

logger = logging.getLogger(log_name(__name__))


DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_days(field: str) -> str:
    """A crontab day-of-week field (0-7, Sunday = 0 and 7, names, ranges, lists, steps) as APScheduler day names."""
    days: set[int] = set()
    for item in field.lower().split(","):
        part, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"day-of-week step {step_text!r} must be >= 1")

        def day(text: str) -> int:
            if text in DAY_NAMES:
                return DAY_NAMES.index(text)
            value = int(text)
            if not 0 <= value <= 7:
                raise ValueError(f"day of week {text!r} is not within 0-7 (0 and 7 are Sunday)")
            return value

        if part == "*":
            low, high = 0, 6
        elif "-" in part:
            first, _, last = part.partition("-")
            low, high = day(first), day(last)
            if high < low:
                raise ValueError(f"day-of-week range {part!r} runs backwards")
        else:
            low = high = day(part)
            if step_text:
                high = 6
        days.update(d % 7 for d in range(low, high + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(DAY_NAMES[d] for d in sorted(days))


def crontab_trigger(schedule: str, timezone: str = "") -> Any:
    """An APScheduler ``CronTrigger`` for a crontab line ``minute hour day month day-of-week`` (module docstring)
    in the IANA ``timezone`` (empty: this machine's local zone); ``ValueError`` for a line that is not one."""
    from apscheduler.triggers.cron import CronTrigger

    fields = schedule.split()
    if len(fields) != 5:
        raise ValueError(f"{schedule!r}: expected five fields (minute hour day-of-month month day-of-week)")
    minute, hour, day, month, weekday = fields
    zone: Any = None
    if timezone:
        import zoneinfo

        zone = zoneinfo.ZoneInfo(timezone)
    return CronTrigger(
        minute=minute, hour=hour, day=day, month=month, day_of_week=_crontab_days(weekday), timezone=zone
    )


def holder_id() -> str:
    """An id for this process as a lease holder: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class LeaseState:
    """A lease as read: its holder (None when never taken or released) and until when."""

    name: str
    holder: str | None
    acquired_at: dt.datetime | None
    expires_at: dt.datetime | None

    def held(self, now: dt.datetime) -> bool:
        return self.holder is not None and self.expires_at is not None and self.expires_at > now


def read(session: Session, name: str) -> LeaseState | None:
    row = session.get(db.Lease, name)
    if row is None:
        return None
    return LeaseState(row.name, row.holder, row.acquired_at, row.expires_at)


def _ensure_row(session: Session, name: str) -> None:
    values = {"name": name, "holder": None, "acquired_at": None, "expires_at": None}
    table = db.Lease.__table__
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(postgresql.insert(table).values(values).on_conflict_do_nothing(index_elements=["name"]))
    elif dialect == "sqlite":
        session.execute(sqlite.insert(table).values(values).on_conflict_do_nothing(index_elements=["name"]))
    elif session.get(db.Lease, name) is None:
        try:
            with session.begin_nested():
                session.add(db.Lease(**values))
        except IntegrityError:
            pass


class Lease:
    """One named lease as seen by one holder (module docstring)."""

    def __init__(self, sessions: sessionmaker[Session], name: str, holder: str, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("a lease must last > 0 seconds")
        self.sessions, self.name, self.holder, self.seconds = sessions, name, holder, seconds

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or ours (then renewed); whether we hold it now."""
        table = db.Lease
        with self.sessions() as session, session.begin():
            _ensure_row(session, self.name)
            now = db.utcnow()
            mine = session.execute(
                update(table)
                .where(table.name == self.name, table.holder == self.holder)
                .values(expires_at=now + dt.timedelta(seconds=self.seconds))
            ).rowcount
            if mine:
                return True
            taken = session.execute(
                update(table)
                .where(table.name == self.name, or_(table.holder.is_(None), table.expires_at <= now))
                .values(holder=self.holder, acquired_at=now, expires_at=now + dt.timedelta(seconds=self.seconds))
            ).rowcount
            return bool(taken)

    def renew(self) -> bool:
        """Extend the lease if we still hold it; False when it is not ours any more (it expired and was taken)."""
        table = db.Lease
        with self.sessions() as session, session.begin():
            now = db.utcnow()
            return bool(
                session.execute(
                    update(table)
                    .where(table.name == self.name, table.holder == self.holder)
                    .values(expires_at=now + dt.timedelta(seconds=self.seconds))
                ).rowcount
            )

    def release(self) -> None:
        """Give the lease up (if it is ours), so that another process may take it at once."""
        table = db.Lease
        with self.sessions() as session, session.begin():
            session.execute(
                update(table)
                .where(table.name == self.name, table.holder == self.holder)
                .values(holder=None, expires_at=None)
            )

    def state(self) -> LeaseState | None:
        with self.sessions() as session:
            db.read_only(session)
            return read(session, self.name)

    def holds(self) -> bool:
        """Whether we hold the lease right now (read from the database)."""
        with self.sessions() as session:
            db.read_only(session)
            row = session.scalars(select(db.Lease).where(db.Lease.name == self.name)).first()
            return (
                row is not None
                and row.holder == self.holder
                and row.expires_at is not None
                and (row.expires_at > db.utcnow())
            )


class Keeper:
    """Renews a held lease every third of its length in a thread until ``stop``; ``lost`` is set (and ``on_lost``
    called) when a renewal finds the lease taken by another, or renewals fail until it has expired."""

    def __init__(self, lease: Lease, on_lost: Callable[[], None] | None = None) -> None:
        self.lease = lease
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.name}", daemon=True)

    def start(self) -> Keeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        interval = self.lease.seconds / 3
        last_ok = db.utcnow()
        while not self._stop.wait(interval):
            try:
                ok = self.lease.renew()
            except SQLAlchemyError as exc:
                if (db.utcnow() - last_ok).total_seconds() < self.lease.seconds:
                    logger.warning("lease %s: renewal failed (%s); retrying", self.lease.name, exc)
                    continue
                ok = False
            if ok:
                last_ok = db.utcnow()
                continue
            logger.error("lease %s: lost (another process holds it now)", self.lease.name)
            self.lost.set()
            if self.on_lost is not None:
                self.on_lost()
            return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
