"""The job queue: one row of ``instances`` per received SOP instance, and every change of its state.

States: ``queued -> processing -> done | refused | failed``; a lease expiry puts ``processing`` back to ``queued``
(or to ``failed`` on the last attempt). Who changes what:

- ``enqueue`` (the listener, and start-up recovery): a new ``queued`` row, its study (opened again if it had been
  completed) and, when the UID exists with other bytes, a ``conflicts`` row; the same UID and bytes again is a
  no-op;
- ``claim`` (workers): ``queued`` (or lease-expired) rows become ``processing`` with a lease and one more attempt.
  On PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED`` then an UPDATE in the same transaction, so workers on
  several hosts never take the same row; on SQLite the same statements run inside ``BEGIN IMMEDIATE``;
- ``held`` + ``finish`` / ``requeue`` (the recorder, inside its transaction): only rows still leased to this worker
  are finished, so a result that arrives after its lease expired and another worker took the job is discarded;
- ``release``: rows held by a stopping worker go back to ``queued`` without counting the interrupted attempt;
- ``release_dead_local_workers``: rows held by a worker process of this host that died go back to ``queued``. When
  the death was abnormal (serve saw the process die, or a start finds jobs of a dead process) the attempt counts
  and ``interruptions`` grows: such a job is then claimed alone, so a file that crashes its worker (a segfault in a
  C decoder) fails with the reason after ``[worker] max_attempts`` and the files of its batch are not blamed;
- ``enqueue_orphans`` (start-up recovery): spool files without a row (a crash between the rename and the insert).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import log_name
from cxr_triage.core import db
from cxr_triage.core.states import StudyState
from cxr_triage.queue import spool

logger = logging.getLogger(log_name(__name__))


@dataclass(frozen=True)
class ReceivedInstance:
    """What the listener learnt from the header and the bytes of one C-STORE."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str | None
    transfer_syntax_uid: str
    calling_ae: str | None
    sha256: str
    size_bytes: int
    accession_number: str | None = None


@dataclass(frozen=True)
class Enqueued:
    """The row of an enqueued instance; ``duplicate`` when the same UID and bytes were already queued."""

    instance_id: int
    duplicate: bool


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds the lease of."""

    id: int
    sop_instance_uid: str
    study_instance_uid: str
    spool_path: str
    attempts: int
    interruptions: int = 0
    """Earlier attempts during which the worker died: such a job is claimed alone and processed in isolation."""


def new_worker_id(pid: int | None = None) -> str:
    """``host:pid:start:random``: unique per worker, and tells which host and process holds a lease.

    ``start`` is the process's start time (``/proc``; ``0`` where there is none), so that a lease of a killed
    worker whose PID has been reused, or which is a zombie not yet reaped, is recognised as dead.
    """
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid) or 0}:{uuid.uuid4().hex[:8]}"


# --- enqueue -------------------------------------------------------------------------------------------------


def _open_study(session: Session, study_uid: str, now: dt.datetime, accession: str | None = None) -> db.Study:
    study = session.scalars(select(db.Study).where(db.Study.study_instance_uid == study_uid)).one_or_none()
    if study is None:
        try:
            with session.begin_nested():
                study = db.Study(
                    study_instance_uid=study_uid, status=StudyState.OPEN, first_received_at=now, last_received_at=now
                )
                session.add(study)
        except IntegrityError:  # another association created it first (PostgreSQL; SQLite writers are serial)
            study = session.scalars(select(db.Study).where(db.Study.study_instance_uid == study_uid)).one()
    if study.status != StudyState.OPEN:
        study.status = StudyState.OPEN
        study.completed_at = None
    study.priority_final = False  # provisional again until the study has been quiet (studies.aggregate_studies)
    study.last_received_at = max(study.last_received_at, now)
    if accession and not study.accession_number:
        study.accession_number = accession[:64]
    return study


def is_queued(session: Session, sop_instance_uid: str, sha256: str) -> bool:
    """Whether this UID with these bytes already has a row (a resend: nothing to do)."""
    return (
        session.scalar(
            select(db.Instance.id).where(db.Instance.sop_instance_uid == sop_instance_uid, db.Instance.sha256 == sha256)
        )
        is not None
    )


def enqueue(session: Session, item: ReceivedInstance, path: Path, now: dt.datetime | None = None) -> Enqueued:
    """Add ``item`` as a queued job (unless the same UID and bytes exist), recording a conflict if the UID exists
    with other bytes (both are kept). The caller commits."""
    now = now or db.utcnow()
    existing = session.scalars(
        select(db.Instance).where(db.Instance.sop_instance_uid == item.sop_instance_uid).order_by(db.Instance.id)
    ).all()
    for other in existing:
        if other.sha256 == item.sha256:
            return Enqueued(instance_id=other.id, duplicate=True)
    study = _open_study(session, item.study_instance_uid, now, item.accession_number)
    instance = db.Instance(
        study_id=study.id,
        sop_instance_uid=item.sop_instance_uid,
        sop_class_uid=item.sop_class_uid,
        study_instance_uid=item.study_instance_uid,
        series_instance_uid=item.series_instance_uid,
        transfer_syntax_uid=item.transfer_syntax_uid,
        calling_ae=item.calling_ae,
        spool_path=str(path),
        sha256=item.sha256,
        size_bytes=item.size_bytes,
        received_at=now,
        status=db.QUEUED,
        attempts=0,
        flagged=False,
    )
    session.add(instance)
    session.flush()
    if existing:
        previous = existing[-1]
        session.add(
            db.Conflict(
                sop_instance_uid=item.sop_instance_uid,
                existing_instance_id=previous.id,
                new_instance_id=instance.id,
                existing_sha256=previous.sha256,
                new_sha256=item.sha256,
                detected_at=now,
            )
        )
        logger.warning(
            "conflict: SOP instance %s arrived again with different bytes (sha256 %s, earlier %s); both kept",
            item.sop_instance_uid,
            item.sha256[:12],
            previous.sha256[:12],
        )
    return Enqueued(instance_id=instance.id, duplicate=False)


def enqueue_orphans(spool_dir: str | os.PathLike[str], sessions: sessionmaker[Session]) -> int:
    """Enqueue spool files that have no row (a crash between the rename and the insert); the number enqueued.

    Their senders were never answered success and will usually send again, which is then a no-op.
    """
    import pydicom

    root = Path(spool_dir).resolve()
    with sessions() as session, session.begin():
        known = set(session.scalars(select(db.Instance.spool_path)).all())
    enqueued = 0
    for path in spool.iter_spool_files(root):
        if str(path) in known:
            continue
        try:
            data = path.read_bytes()
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            item = ReceivedInstance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.get("SeriesInstanceUID") or "") or None,
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                calling_ae=None,
                sha256=spool.sha256_bytes(data),
                size_bytes=len(data),
                accession_number=str(ds.get("AccessionNumber") or "").strip() or None,
            )
        except Exception:
            logger.exception("spool file %s has no database row and cannot be read; left in place", path)
            continue
        with sessions() as session, session.begin():
            outcome = enqueue(session, item, path)
        if not outcome.duplicate:
            enqueued += 1
            logger.warning(
                "recovered spool file %s (SOP instance %s) with no database row", path, item.sop_instance_uid
            )
    return enqueued


# --- claim, finish, release ----------------------------------------------------------------------------------


def _fail_abandoned(session: Session, now: dt.datetime, max_attempts: int) -> int:
    """Lease-expired jobs already at their last attempt: failed, with the reason."""
    abandoned = session.execute(
        update(db.Instance)
        .where(
            db.Instance.status == db.PROCESSING,
            db.Instance.lease_until < now,
            db.Instance.attempts >= max_attempts,
        )
        .values(
            status=db.FAILED,
            completed_at=now,
            lease_until=None,
            claimed_by=None,
            error=func.coalesce(db.Instance.error, "abandoned: the lease expired on the last attempt (worker died?)"),
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if abandoned:
        logger.error("%d job(s) failed: lease expired on attempt %d of %d", abandoned, max_attempts, max_attempts)
    return int(abandoned or 0)


def _claimable_ids(session: Session, now: dt.datetime, limit: int) -> list[int]:
    """The ids to claim, locked: one job whose worker died with it, alone (module docstring); else up to ``limit``
    queued or lease-expired jobs, oldest first."""
    claimable = or_(
        db.Instance.status == db.QUEUED,
        (db.Instance.status == db.PROCESSING) & (db.Instance.lease_until < now),
    )
    for condition, count in ((claimable & (db.Instance.interruptions > 0), 1), (claimable, limit)):
        ids = session.scalars(
            select(db.Instance.id)
            .where(condition)
            .order_by(db.Instance.id)
            .limit(count)
            .with_for_update(skip_locked=True)
        ).all()
        if ids:
            return list(ids)
    return []


def claim(
    sessions: sessionmaker[Session],
    worker_id: str,
    limit: int,
    lease_seconds: float,
    max_attempts: int,
    now: dt.datetime | None = None,
) -> list[ClaimedJob]:
    """Claim up to ``limit`` jobs: queued ones, and processing ones whose lease expired.

    An expired job that has already had ``max_attempts`` attempts is marked failed instead of being claimed.
    """
    now = now or db.utcnow()
    with sessions() as session, session.begin():
        _fail_abandoned(session, now, max_attempts)
        ids = _claimable_ids(session, now, limit)
        if not ids:
            return []
        session.execute(
            update(db.Instance)
            .where(db.Instance.id.in_(ids))
            .values(
                status=db.PROCESSING,
                attempts=db.Instance.attempts + 1,
                lease_until=now + dt.timedelta(seconds=lease_seconds),
                claimed_by=worker_id,
            )
            .execution_options(synchronize_session=False)
        )
        rows = session.execute(
            select(
                db.Instance.id,
                db.Instance.sop_instance_uid,
                db.Instance.study_instance_uid,
                db.Instance.spool_path,
                db.Instance.attempts,
                db.Instance.interruptions,
            )
            .where(db.Instance.id.in_(ids))
            .order_by(db.Instance.id)
        ).all()
    return [
        ClaimedJob(r.id, r.sop_instance_uid, r.study_instance_uid, r.spool_path, r.attempts, r.interruptions)
        for r in rows
    ]


def held(session: Session, jobs: Sequence[ClaimedJob], worker_id: str) -> dict[int, db.Instance]:
    """The rows of ``jobs`` still leased to ``worker_id``, locked for this transaction (one may have expired and
    been claimed again by another worker: its result is then discarded)."""
    rows = session.scalars(
        select(db.Instance).where(db.Instance.id.in_([job.id for job in jobs])).with_for_update()
    ).all()
    owned = {r.id: r for r in rows if r.status == db.PROCESSING and r.claimed_by == worker_id}
    for job in jobs:
        if job.id not in owned:
            logger.warning("job %s is no longer held by %s; result discarded", job.id, worker_id)
    return owned


def finish(instance: db.Instance, status: str, now: dt.datetime) -> None:
    """``done``, ``refused`` or ``failed``: the job leaves the queue."""
    instance.status = status
    instance.completed_at = now
    instance.lease_until = None
    instance.claimed_by = None


def retry_or_fail(instance: db.Instance, error: str, max_attempts: int, now: dt.datetime) -> bool:
    """A failed attempt: back to ``queued`` for another, or ``failed`` after the last; True when it failed."""
    instance.error = error[:4000]
    if instance.attempts >= max_attempts:
        finish(instance, db.FAILED, now)
        return True
    instance.status = db.QUEUED
    instance.lease_until = None
    instance.claimed_by = None
    return False


def release(sessions: sessionmaker[Session], claimed_by: str | Sequence[str]) -> int:
    """Put the jobs a worker holds back in the queue, not counting the interrupted attempt."""
    owners = [claimed_by] if isinstance(claimed_by, str) else list(claimed_by)
    if not owners:
        return 0
    with sessions() as session, session.begin():
        result = session.execute(
            update(db.Instance)
            .where(db.Instance.status == db.PROCESSING, db.Instance.claimed_by.in_(owners))
            .values(status=db.QUEUED, attempts=db.Instance.attempts - 1, lease_until=None, claimed_by=None)
            .execution_options(synchronize_session=False)
        )
    count = int(result.rowcount or 0)
    if count:
        logger.info("released %d claimed job(s) of %s back to the queue", count, ", ".join(owners))
    return count


EARLIER_RUN_DIED = "a worker process of an earlier run ended abnormally (killed or crashed)"
"""The cause recorded for jobs that a start-up finds held by a dead worker process of this host."""


def release_dead_local_workers(
    sessions: sessionmaker[Session], max_attempts: int | None = None, cause: str = "the worker process died"
) -> int:
    """Release jobs claimed by worker processes of this host that no longer exist (killed, crashed, zombies).

    ``max_attempts`` None: the workers were stopped on purpose (killed after the stop timeout) and the attempts do
    not count. Otherwise the death is a fault the job may have caused (``cause`` says what is known of it): see
    ``interrupted``.
    """
    prefix = f"{socket.gethostname()}:"
    with sessions() as session, session.begin():
        owners = set(
            session.scalars(
                select(db.Instance.claimed_by).where(
                    db.Instance.status == db.PROCESSING, db.Instance.claimed_by.like(f"{prefix}%")
                )
            ).all()
        )
    dead = [owner for owner in owners if not _worker_alive(owner[len(prefix) :])]
    if not dead:
        return 0
    if max_attempts is None:
        return release(sessions, dead)
    return interrupted(sessions, dead, max_attempts, cause)


def interrupted(sessions: sessionmaker[Session], owners: Sequence[str], max_attempts: int, cause: str) -> int:
    """The jobs of dead workers ``owners``: the attempt counts, and each is claimed alone from now on; a job whose
    worker has died on each of its ``max_attempts`` attempts is failed with ``cause`` as the reason."""
    now = db.utcnow()
    failed = 0
    with sessions() as session, session.begin():
        rows = session.scalars(
            select(db.Instance)
            .where(db.Instance.status == db.PROCESSING, db.Instance.claimed_by.in_(list(owners)))
            .with_for_update()
        ).all()
        for row in rows:
            row.interruptions += 1
            error = f"{cause} while processing this file (attempt {row.attempts} of {max_attempts})"
            if row.attempts >= max_attempts and row.interruptions >= row.attempts:
                error = f"crashed the worker: {cause} on each of the {row.attempts} attempts to process this file"
            failed += retry_or_fail(row, error, max_attempts, now)
    if rows:
        logger.error(
            "%s: %d job(s) it held back in the queue, to be processed one at a time; %d failed after %d attempts",
            cause,
            len(rows) - failed,
            failed,
            max_attempts,
        )
    return len(rows)


def is_dead_local_worker(worker_id: str) -> bool:
    """Whether ``worker_id`` names a worker process of this host that no longer runs (False for another host's)."""
    prefix = f"{socket.gethostname()}:"
    return worker_id.startswith(prefix) and not _worker_alive(worker_id[len(prefix) :])


def _worker_alive(local_id: str) -> bool:
    """Whether the worker ``pid:start:random`` (or an older ``pid:random``) of this host still runs."""
    parts = local_id.split(":")
    try:
        pid = int(parts[0])
    except ValueError:
        return True  # not ours to judge
    if pid == os.getpid():
        return False  # this process is starting up: whatever it held before was an earlier life's
    start = _process_start(pid)
    if start is not None and len(parts) >= 3 and parts[1] != "0":
        return parts[1] == start  # the same PID may belong to a newer process
    if start is None and Path("/proc/self/stat").exists():
        return False  # gone, or a zombie
    return _pid_alive(pid)


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), or ``None`` where
    the process is gone, is a zombie, or the system has no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name (field 2) may hold spaces and parentheses
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # state (field 3): zombie or dead
        return None
    return fields[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
