"""Structured Report files: every SR file in ``[storage] sr_dir`` belongs to a committed ``sr_documents`` row, and
every row's file is there, whatever point a crash (SIGKILL, power loss) stops a worker at. The heatmap object an SR
references (``outputs.heatmapobject``) is a file of the same kind: ``<sr_dir>/<study>/<its SOP Instance UID>.dcm``,
its row the SR's (``heatmap_sop_instance_uid``, ``heatmap_path``), written, renamed and swept as below.

A report's final path, the one its row holds, is ``<sr_dir>/<Study Instance UID>/<SR SOP Instance UID>.dcm``
(``final_path``). The recorder writes it first to ``<sr_dir>/.pending/<SR UID>.dcm+<writer>`` (``write_pending``;
the writer is the worker id, URL-quoted), fsyncs the file and that folder, commits the rows, and only then renames
the file to its final path (``publish``) and fsyncs the folders. So a crash leaves at most:

- before the commit: a pending file without a row. Its job is still claimed by the dead worker; it is released
  and processed again, with a new report. The file is deleted (it carries patient data);
- after the commit, before the rename: a committed row whose file is still pending. It is renamed to the row's
  path;

and never a final file without its row.

Who settles pending files, and when (``settle_pending``). A pending file may be a worker's that is writing right
now, between its write and its commit, on this host or on another that shares ``sr_dir``. One with a committed row
is always safe to rename: that is what its writer does next, and whichever rename comes second finds it done. One
without a row is deleted only when its writer is known to be gone: a worker process of this host that no longer
runs (``jobqueue.is_dead_local_worker``: the writer is in the file's name), or any writer once the file is older
than ``ABANDONED_AFTER`` (a writer takes milliseconds from its write to its commit; a worker on another host that
died leaves its files to that host's next start, or to this age). ``serve`` settles at start-up, before its
workers start, and each time it restarts a worker process that died; ``cxr-triage worker`` at start-up. A
reader of a committed row's path (forwarding, the recorder reading a previous report) calls ``ensure_final``,
which completes a rename that a crash, or the moment between a commit and its rename, left undone.

``sweep_orphans`` looks through every study folder for report files without a row and for the temporaries of
atomic writes, which only older releases left (they wrote the final file before the commit). It removes only files
older than ``ABANDONED_AFTER``, so that a worker of an older release still running elsewhere keeps the file it is
about to commit; for the same reason it is safe beside running workers, and ``serve`` runs it in a background
thread once started (it reads every study folder: about 1 s per 20,000 reports here). Rows are matched by SOP
Instance UID, not by path, so a moved ``sr_dir`` loses nothing. ``sr_dir`` belongs to one database: two
installations must not share it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage import files, log_name
from cxr_triage.core import db
from cxr_triage.queue import jobqueue, spool

logger = logging.getLogger(log_name(__name__))

PENDING_DIR = ".pending"
"""The folder of ``sr_dir`` holding reports written but not yet known to be committed."""
SR_SUFFIX = ".dcm"
ABANDONED_AFTER = 3600.0
"""Seconds after which a pending file without a row, or a report file without a row, is taken as abandoned by any
writer (module docstring)."""
QUERY_BATCH = 500
"""SOP Instance UIDs looked up per query."""

_SEPARATOR = "+"  # never in a report's file name (a UID and ".dcm"), always quoted in the writer's id
_MAX_NAME = 255
_REPORT_NAME = re.compile(r"^[0-9]+(\.[0-9]+)*\.dcm$")


def final_path(sr_dir: str | os.PathLike[str], study_instance_uid: str, sr_uid: str) -> Path:
    """Where the report ``sr_uid`` of a study lives once committed (the path its row holds)."""
    return Path(sr_dir) / spool.safe_uid(study_instance_uid) / f"{sr_uid}{SR_SUFFIX}"


def pending_path(final: Path, writer: str) -> Path:
    """Where ``writer`` writes the report of ``final`` until its row has committed."""
    name = final.name + _SEPARATOR
    quoted = quote(writer, safe="")[: _MAX_NAME - len(name)]  # a cut id is no host's: only its age then counts
    return final.parent.parent / PENDING_DIR / f"{name}{quoted}"


def _parse(name: str) -> tuple[str, str] | None:
    """(final file name, writer) of a pending file's name; None for a name that is not one."""
    final, separator, writer = name.partition(_SEPARATOR)
    if not separator or not _REPORT_NAME.match(final):
        return None
    return final, unquote(writer)


def _uid(final_name: str) -> str:
    return final_name[: -len(SR_SUFFIX)]


def write_pending(final: Path, data: bytes, writer: str) -> Path:
    """Write the report of ``final`` under its pending name, fsynced; its study folder is made now too, so that the
    rename after the commit cannot fail for want of it. The caller fsyncs the pending folder before committing
    (``files.fsync_dir(pending.parent)``, once for many)."""
    files.make_folder(final.parent)
    return files.write_synced(pending_path(final, writer), data)


def publish(moves: Iterable[tuple[Path, Path]]) -> int:
    """Rename the pending files of committed reports, ``(pending, final)``, into place and fsync the folders; the
    number renamed. A failure is logged and left to ``ensure_final`` and ``settle_pending``."""
    folders: set[Path] = set()
    renamed = 0
    for pending, final in moves:
        try:
            os.replace(pending, final)
        except OSError:
            if not (final.is_file() and not pending.exists()):  # else another settler renamed it first
                logger.exception("SR %s committed, but its file could not be renamed into place yet", final.name)
            continue
        folders.update((pending.parent, final.parent))
        renamed += 1
    _sync(folders)
    return renamed


def ensure_final(path: str | os.PathLike[str]) -> bool:
    """Whether the report of a committed row is at ``path`` (its row's path), after completing its rename if its
    file is still pending (module docstring). Call it only for a row read from the database."""
    final = Path(path)
    if final.is_file():
        return True
    pending_dir = final.parent.parent / PENDING_DIR
    try:
        names = os.listdir(pending_dir)
    except OSError:
        return False
    prefix = final.name + _SEPARATOR
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            files.make_folder(final.parent)
            os.replace(pending_dir / name, final)
        except FileNotFoundError:
            continue  # renamed by its writer or another reader meanwhile
        _sync({pending_dir, final.parent})
        logger.warning("SR %s: committed file renamed into place (its writer had not done it yet)", final.name)
        return True
    return final.is_file()


@dataclass(frozen=True)
class Settled:
    """What became of pending files: renamed into place (committed), deleted (never committed, their writer gone),
    kept (their writer may still commit)."""

    renamed: int = 0
    deleted: int = 0
    kept: int = 0


def _committed_paths(sessions: sessionmaker[Session], uids: Sequence[str]) -> dict[str, str]:
    """SOP Instance UID -> path of the ``sr_documents`` rows among ``uids``: their reports and their heatmap
    objects (``heatmap_sop_instance_uid``, ``heatmap_path``), which live beside them under the same protocol."""
    found: dict[str, str] = {}
    report = (db.SRDocument.sop_instance_uid, db.SRDocument.path)
    heatmap = (db.SRDocument.heatmap_sop_instance_uid, db.SRDocument.heatmap_path)
    with sessions() as session:
        db.read_only(session)
        for start in range(0, len(uids), QUERY_BATCH):
            batch = uids[start : start + QUERY_BATCH]
            for uid_column, path_column in (report, heatmap):
                rows = session.execute(select(uid_column, path_column).where(uid_column.in_(batch))).all()
                found.update((uid, path) for uid, path in rows if uid is not None and path is not None)
        session.rollback()
    return found


def settle(
    sessions: sessionmaker[Session],
    pending: Sequence[Path],
    may_delete: Callable[[str | None, float], bool] = lambda _writer, _age: True,
    now: float | None = None,
) -> Settled:
    """Settle the pending files ``pending``: those with a committed row are renamed to the row's path, the others
    deleted where ``may_delete(writer, age in seconds)`` says so (the default: always, for a writer settling its own
    files), else kept. Raises when the database cannot be read, having changed nothing."""
    now = time.time() if now is None else now
    parsed = {path: _parse(path.name) for path in pending}
    committed = _committed_paths(sessions, sorted({_uid(p[0]) for p in parsed.values() if p is not None}))
    deleted, kept = 0, 0
    moves: list[tuple[Path, Path]] = []
    for path, parts in parsed.items():
        final = committed.get(_uid(parts[0])) if parts is not None else None
        if final is not None:
            if Path(final).is_file():  # renamed by another settler meanwhile
                path.unlink(missing_ok=True)
            else:
                files.make_folder(Path(final).parent)
                moves.append((path, Path(final)))
            continue
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue  # renamed or deleted meanwhile
        if may_delete(parts[1] if parts is not None else None, age):
            path.unlink(missing_ok=True)
            deleted += 1
        else:
            kept += 1
    renamed = publish(moves)
    if deleted:
        _sync({path.parent for path in pending})
    return Settled(renamed, deleted, kept)


def _pending_files(sr_dir: Path) -> list[Path]:
    try:
        return sorted(entry for entry in (sr_dir / PENDING_DIR).iterdir() if entry.is_file())
    except FileNotFoundError:
        return []


def _abandoned(writer: str | None, age: float) -> bool:
    return age > ABANDONED_AFTER or (writer is not None and jobqueue.is_dead_local_worker(writer))


def settle_pending(sr_dir: str | os.PathLike[str], sessions: sessionmaker[Session]) -> Settled:
    """Settle every pending file of ``sr_dir`` whose writer is gone (module docstring): renamed into place when its
    row committed, else deleted; a live writer's are kept."""
    pending = _pending_files(Path(sr_dir).resolve())
    if not pending:
        return Settled()
    settled = settle(sessions, pending, _abandoned)
    if settled.renamed or settled.deleted:
        logger.warning(
            "SR files left by a crash: %d committed renamed into place, %d never committed deleted",
            settled.renamed,
            settled.deleted,
        )
    return settled


def _old_files(sr_dir: Path, now: float) -> Iterator[tuple[str, str | None]]:
    """Report files (with their UID) and temporaries (None) of the study folders older than ``ABANDONED_AFTER``."""
    with os.scandir(sr_dir) as studies:
        for study in studies:
            if study.name.startswith(".") or not study.is_dir(follow_symlinks=False):
                continue
            with os.scandir(study.path) as entries:
                for entry in entries:
                    name = entry.name
                    report = _REPORT_NAME.match(name) is not None
                    if not (report or name.startswith(files.TEMP_PREFIX)) or not entry.is_file(follow_symlinks=False):
                        continue  # not a file of ours
                    try:
                        old = now - entry.stat(follow_symlinks=False).st_mtime > ABANDONED_AFTER
                    except FileNotFoundError:
                        continue
                    if old:
                        yield entry.path, _uid(name) if report else None


def sweep_orphans(sr_dir: str | os.PathLike[str], sessions: sessionmaker[Session], now: float | None = None) -> int:
    """Delete the study folders' report files without a row and stray temporaries, older than ``ABANDONED_AFTER``
    (module docstring); the number deleted."""
    root = Path(sr_dir).resolve()
    if not root.is_dir():
        return 0
    now = time.time() if now is None else now
    removed = 0
    batch: list[tuple[str, str]] = []

    def flush() -> int:
        known = _committed_paths(sessions, sorted({uid for _, uid in batch}))
        orphans = [path for path, uid in batch if uid not in known]
        for path in orphans:
            logger.warning("SR file %s has no database row: deleted", path)
            Path(path).unlink(missing_ok=True)
        batch.clear()
        return len(orphans)

    for path, uid in _old_files(root, now):
        if uid is None:
            Path(path).unlink(missing_ok=True)
            removed += 1
            continue
        batch.append((path, uid))
        if len(batch) >= QUERY_BATCH:
            removed += flush()
    if batch:
        removed += flush()
    if removed:
        logger.warning("removed %d SR file(s) without a database row, left by an older release's crash", removed)
    return removed


def _sync(folders: Iterable[Path]) -> None:
    for folder in sorted(set(folders)):
        try:
            files.fsync_dir(folder)
        except OSError:
            logger.exception("SR folder %s could not be synced", folder)
