"""The spool: received instances written atomically to disk before the sender is told they are safe.

Files are written with ``cxr_triage.files.write_atomic``, so after a crash a spool file is either complete or
absent (a stray temporary file is removed by ``remove_stale_temporaries`` at start-up). Spool names hold the SOP
Instance UID and the sha256 of the bytes, so the same UID with different bytes gets its own file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from cxr_triage import log_name
from cxr_triage.files import TEMP_PREFIX

logger = logging.getLogger(log_name(__name__))

Buffer = bytes | bytearray | memoryview
SPOOL_SUFFIX = ".dcm"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def sha256_bytes(data: Buffer | Sequence[Buffer]) -> str:
    """The hex SHA-256 of ``data``, or of its parts one after the other (no copy is made of them)."""
    digest = hashlib.sha256()
    for part in (data,) if isinstance(data, Buffer) else data:
        digest.update(part)
    return digest.hexdigest()


def free_mb(directory: str | os.PathLike[str]) -> float:
    """Free space (for unprivileged users) on the file system holding ``directory``, in MiB."""
    path = Path(directory)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / (1024 * 1024)


def safe_uid(uid: str | None) -> str:
    """A UID usable in a file name; anything that is not a well-formed UID becomes ``invalid-uid``."""
    uid = (uid or "").strip()
    return uid if _UID.match(uid) and len(uid) <= 64 else "invalid-uid"


def spool_path(spool_dir: str | os.PathLike[str], sop_instance_uid: str, sha256: str) -> Path:
    """``<spool>/<sha[:2]>/<SOP Instance UID>_<sha256>.dcm``: distinct bytes, distinct files."""
    return Path(spool_dir) / sha256[:2] / f"{safe_uid(sop_instance_uid)}_{sha256}{SPOOL_SUFFIX}"


def iter_spool_files(spool_dir: str | os.PathLike[str]) -> Iterator[Path]:
    root = Path(spool_dir)
    if not root.is_dir():
        return
    for path in sorted(root.glob(f"*/*{SPOOL_SUFFIX}")):
        if not path.name.startswith(TEMP_PREFIX):
            yield path


def remove_stale_temporaries(spool_dir: str | os.PathLike[str]) -> int:
    """Delete temporary files left by a crash before their rename (their senders were never answered)."""
    root = Path(spool_dir)
    removed = 0
    if root.is_dir():
        for path in root.glob(f"**/{TEMP_PREFIX}*"):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.warning("removed %d incomplete spool file(s) left by an earlier crash", removed)
    return removed
