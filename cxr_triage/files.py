"""Atomic file writes: a crash leaves either the whole new file or the old one, never a part.

``write_atomic`` writes a temporary file in the destination folder, fsyncs it, renames it into place and fsyncs
the folder (a new folder's own entry too). Every file the project writes for keeps goes through it (spool files,
checkpoints, training state, packs and reports), except Structured Reports. Temporary names start with ``TEMP_PREFIX``
so that start-up recovery can remove the ones a crash left behind (``spool.remove_stale_temporaries``).

``write_synced`` is the non-atomic half, for a caller that renames the file into place itself later and whose
name for it says it is unfinished until then: a Structured Report is renamed only once its row has committed
(``cxr_triage.outputs.srfiles``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a folder's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder(folder: str | os.PathLike[str]) -> None:
    """Create ``folder`` (and its parents) if it is missing, its own entry made durable."""
    folder = Path(folder)
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(folder.parent)


def write_synced(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to the new file ``path`` (created, never overwritten) and fsync it, not its folder.

    Not atomic: a crash can leave part of the file, so ``path`` must be a name that says the file is unfinished
    until the caller renames it into place. A failure removes the file.
    """
    path = Path(path)
    make_folder(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def write_atomic(
    path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], object], sync_dir: bool = True
) -> Path:
    """Write ``data`` (bytes, or a function that writes to the open file, e.g. ``lambda f: torch.save(x, f)``)
    to ``path`` atomically (module docstring).

    With ``sync_dir=False`` the caller fsyncs the folder itself (once for many files) before relying on them.
    """
    path = Path(path)
    make_folder(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, bytes | bytearray | memoryview):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read a MiB at a time: how a checkpoint, a gate file or a model version is named."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
