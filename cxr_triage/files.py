"""Atomic file writes: a crash leaves either the whole new file or the old one, never a part.

``write_atomic`` writes a temporary file in the destination folder, fsyncs it, renames it into place and fsyncs
the folder (a new folder's own entry too). Every file the project writes for keeps goes through it: spool files,
Structured Reports, checkpoints, training state, packs and reports. Temporary names start with ``TEMP_PREFIX``
so that start-up recovery can remove the ones a crash left behind (``spool.remove_stale_temporaries``).
"""

from __future__ import annotations

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


def write_atomic(
    path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], object], sync_dir: bool = True
) -> Path:
    """Write ``data`` (bytes, or a function that writes to the open file, e.g. ``lambda f: torch.save(x, f)``)
    to ``path`` atomically (module docstring).

    With ``sync_dir=False`` the caller fsyncs the folder itself (once for many files) before relying on them.
    """
    path = Path(path)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent.parent)  # the new folder's own entry must survive a crash too
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
