"""A PACS's parallel send: several dcmtk ``storescu`` processes from one host at once, each over one association,
against a running ``cxr-triage serve``; what the receiver recorded is read from its database (never from the
senders' exit statuses). Used by ``tests/test_pacs_defaults.py`` and ``bench/pacs_defaults.py``."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from cxr_triage.core import db
from cxr_triage.testing import peers, synthetic


def make_files(folder: Path, senders: int, per_sender: int, size: int = 64) -> list[list[Path]]:
    """``per_sender`` small synthetic chest CRs (``size`` pixels a side, new UIDs each) for each of ``senders``."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[Path]] = []
    for sender in range(senders):
        group = []
        for index in range(per_sender):
            ds = synthetic.chest_dataset(size, size, seed=sender * per_sender + index)
            path = folder / f"s{sender:02d}-{index:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            group.append(path)
        groups.append(group)
    return groups


@dataclass
class ParallelResult:
    senders: int
    sent: int
    recorded: int
    """Instances of those sent that the receiver has a row for (it answers 0x0000 only once the row is in)."""
    statuses: Counter[str]
    seconds: float
    """From the first sender's start to the last sender's end."""


def send_parallel(port: int, groups: list[list[Path]], ae_title: str = "CXR_TRIAGE", timeout: float = 600) -> float:
    """Start one storescu per group at once (calling AE ``PACS``: one host, one PACS); the seconds until all ended."""
    storescu = peers.dcmtk_tool("storescu")
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [storescu, "-aet", "PACS", "-aec", ae_title, "-to", "60", "-ta", "60", "-td", "120"]
            + ["127.0.0.1", str(port), *map(str, group)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for group in groups
    ]
    for proc in procs:
        proc.wait(timeout=timeout)
    return time.perf_counter() - started


def recorded(url: str, groups: list[list[Path]]) -> Counter[str]:
    """The status of each recorded instance row among those of ``groups``, counted."""
    import pydicom

    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for group in groups for p in group]
    engine = db.make_engine(url, create_dirs=False)
    statuses: Counter[str] = Counter()
    try:
        with db.read_session(engine) as session:
            for start in range(0, len(uids), 500):
                rows = session.execute(
                    select(db.Instance.status).where(db.Instance.sop_instance_uid.in_(uids[start : start + 500]))
                ).all()
                statuses.update(str(getattr(row[0], "value", row[0])) for row in rows)
    finally:
        engine.dispose()
    return statuses


def run(port: int, url: str, groups: list[list[Path]], ae_title: str = "CXR_TRIAGE") -> ParallelResult:
    """Send ``groups`` in parallel and read what the receiver recorded."""
    seconds = send_parallel(port, groups, ae_title)
    statuses = recorded(url, groups)
    return ParallelResult(
        senders=len(groups),
        sent=sum(len(g) for g in groups),
        recorded=sum(statuses.values()),
        statuses=statuses,
        seconds=seconds,
    )
