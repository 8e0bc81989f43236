"""Faults around a running node: PostgreSQL stopped under a sending PACS and started again, the spool's file system
below its reserve and then full (a small tmpfs), and PACS destinations that are full or hung. Each ends with
everything acknowledged classified and delivered. (A destination whose port is closed, with its back-off, dead
letter and ``forward --retry``: tests/test_forward.py.) Figures: docs/RELIABILITY.md, Faults."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import chest_dataset, free_port, write_config
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage
from sqlalchemy import func, select

from cxr_triage.core import db
from cxr_triage.files import TEMP_PREFIX
from cxr_triage.outputs import forward
from cxr_triage.testing import faults, peers

OUTAGE_SECONDS = 10
"""The database outage in CI; ``python -m cxr_triage.testing.faults`` runs the 30-second one."""
MIB = 1 << 20


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.peers
def test_postgresql_stopped_under_a_sending_pacs_is_answered_a701_and_caught_up(tmp_path: Path) -> None:
    report = faults.run_outage(tmp_path, OUTAGE_SECONDS)
    print(report.summary())
    assert report.problems == [], f"{report.problems}\n{report.summary()}"
    answered = sum(report.during.values())
    assert answered >= 4, "storescu kept sending during the outage"
    assert dict(report.during) == {"Refused: OutOfResources": answered}, "0xA701, which a PACS retries"
    refused = answered + report.refused_after_restart
    assert dict(report.during_codes) == {"0xA701": refused}, "the listener refused before writing anything"
    assert report.listener_error_lines == 1, "one ERROR when the database went away, not one per C-STORE"
    assert report.acknowledged == report.sent == report.done and report.lost == 0
    assert report.caught_up_s is not None


# --- the spool's file system ---------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted on ``path`` (root only: the tests run as root, in CI too)."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def fill(path: Path, leave_mb: float) -> Path:
    """A ballast file taking the file system of ``path`` down to about ``leave_mb`` MiB free."""
    import shutil

    ballast = path / "ballast"
    free = shutil.disk_usage(path).free
    with ballast.open("wb") as fh:
        fh.truncate(0)
        remaining = max(0, free - int(leave_mb * MIB))
        block = b"\0" * MIB
        while remaining > 0:
            remaining -= fh.write(block[: min(remaining, MIB)])
    return ballast


def _spool_files(spool: Path) -> list[Path]:
    return sorted(p for p in spool.rglob("*") if p.is_file())


def test_a_spool_below_its_reserve_answers_a700_then_a_full_one_too_and_recovers(
    make_harness, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.ERROR, logger="cxr_triage.listener")
    with tmpfs(tmp_path / "mnt", 24) as mnt:
        spool = mnt / "spool"
        harness = make_harness(storage={"spool_dir": str(spool), "min_free_mb": 4})
        ballast = fill(mnt, leave_mb=2)
        below = [chest_dataset(seed=1), chest_dataset(seed=2)]
        assert harness.send(below) == [0xA700, 0xA700], "below the reserve: refused, out of resources"
        assert _spool_files(spool) == []
        assert sum("below the reserve of 4 MiB" in r.getMessage() for r in caplog.records) == 2

        # Above the reserve but smaller than the instance: the write itself fails (ENOSPC), its temporary removed.
        ballast.unlink()
        ballast = fill(mnt, leave_mb=6)
        big = chest_dataset(2240, 2240, seed=3)  # 9.6 MiB of pixels
        assert harness.send([big]) == [0xA700]
        assert _spool_files(spool) == [], "no partial file or temporary left"
        assert "No space left on device" in str(caplog.records[-1].exc_info[1])
        assert caplog.records[-1].getMessage().startswith("cannot write SOP instance")
        with harness.sessions() as session:
            assert session.scalar(select(func.count()).select_from(db.Instance)) == 0

        ballast.unlink()  # space returns: the PACS's retries are taken
        assert harness.send([*below, big]) == [0, 0, 0]
        assert harness.work() == 3
        assert [r["status"] for r in harness.rows()] == ["ok"] * 3
        assert not any(p.name.startswith(TEMP_PREFIX) for p in _spool_files(spool))
        harness.stop()


# --- PACS destinations that are full or hung -----------------------------------------------------------------


@contextlib.contextmanager
def pacs(port: int, ae_title: str, status: list[int]) -> Iterator[list[str]]:
    """A Storage SCP answering ``status[0]`` to every C-STORE (change it to recover); the SR UIDs it stored."""
    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        if status[0] == 0:
            stored.append(str(event.dataset.SOPInstanceUID))
        return status[0]

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(ComprehensiveSRStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield stored
    finally:
        server.shutdown()


@contextlib.contextmanager
def hung(port: int) -> Iterator[None]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    try:
        yield
    finally:
        sock.close()


def test_a_full_and_a_hung_pacs_are_retried_dead_lettered_and_delivered_by_forward_retry(make_harness) -> None:
    full_port, hung_port = free_port(), free_port()
    harness = make_harness(
        forward={
            "destinations": [
                {"ae_title": "FULL", "host": "127.0.0.1", "port": full_port},
                {"ae_title": "HUNG", "host": "127.0.0.1", "port": hung_port},
            ],
            "max_attempts": 2,
            "backoff_seconds": 10,
            "timeout": 2,
        }
    )
    status = [0xA700]  # the PACS's own disk is full
    with pacs(full_port, "FULL", status) as stored, hung(hung_port):
        assert harness.send([chest_dataset(seed=1), chest_dataset(seed=2)]) == [0, 0]
        harness.work()  # classified, then the first forwarding round
        rows = _forwards(harness)
        assert {(r.destination.split("@")[0], r.state, r.attempts) for r in rows} == {
            ("FULL", db.FORWARD_PENDING, 1),
            ("HUNG", db.FORWARD_PENDING, 1),
        }
        assert {r.status for r in rows if r.destination.startswith("FULL")} == {0xA700}
        hung_errors = {r.last_error for r in rows if r.destination.startswith("HUNG")}
        assert all("timed out" in e or "not established" in e or "no response" in e for e in hung_errors), hung_errors
        later = db.utcnow() + dt.timedelta(seconds=11)
        outcomes = forward.process_due(harness.sessions, harness.settings.forward, now=later)
        assert {(o.state, o.attempts) for o in outcomes} == {(db.FORWARD_DEAD, 2)} and len(outcomes) == 4
        assert stored == []
    srs = {row["sr_sop_instance_uid"] for row in harness.rows()}

    status[0] = 0  # both back: the full one freed space, the hung one restarted as a working PACS
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    with pacs(full_port, "FULL", status) as full, pacs(hung_port, "HUNG", status) as restarted:
        done = peers.cli("forward", "--retry", "--json", config=config, timeout=120)
    resent = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert {(r["state"], r["status"]) for r in resent} == {("sent", 0)} and len(resent) == 4
    assert set(full) == set(restarted) == srs
    assert {r.state for r in _forwards(harness)} == {db.FORWARD_SENT}


def _forwards(harness) -> list[db.Forward]:
    with harness.sessions() as session:
        return list(session.scalars(select(db.Forward).order_by(db.Forward.id)).all())
