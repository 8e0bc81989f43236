"""Crashes while Structured Reports are written: whatever point a worker is killed at, start-up recovery leaves
exactly one SR file per ``sr_documents`` row and no other file, and the instances are all classified in the end.

The points are forced in a worker subprocess that SIGKILLs itself (before the commit, during the pending write,
after the commit, halfway through the renames); a real ``cxr-triage serve`` is also SIGKILLed at random points of
a dcmtk ``storescu`` burst (``cxr_triage.testing.crash``; more runs: ``python -m cxr_triage.testing.crash``). The
rules for pending files of live writers, of other hosts and of old age, and the sweep of files without a row, are
checked one by one.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import chest_dataset, write_config
from sqlalchemy import select

from cxr_triage import files
from cxr_triage.core import db
from cxr_triage.ops import server
from cxr_triage.outputs import srfiles
from cxr_triage.queue import jobqueue
from cxr_triage.testing import crash

CRASHING_WORKER = """
import os, signal, sys
from pathlib import Path
from cxr_triage import files
from cxr_triage.core import db
from cxr_triage.outputs import srfiles
from cxr_triage.triage.recorder import Recorder
from cxr_triage.core.settings import load_settings
from cxr_triage.triage.worker import Worker

config, point = sys.argv[1:]
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if point == "after_write":
    Recorder.commit = die
elif point == "mid_write":
    def half(path, data):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data[: len(data) // 2])
        die()
    files.write_synced = half
elif point == "after_commit":
    srfiles.publish = die
elif point == "mid_rename":
    publish = srfiles.publish
    def first_then_die(moves):
        publish(list(moves)[:1])
        die()
    srfiles.publish = first_then_die
settings = load_settings(config)
Worker(settings, db.make_engine(settings.database.url)).run_until_idle()
sys.exit(3)
"""
"""A worker that SIGKILLs itself at ``point`` of recording its first chunk."""

POINTS = {"after_write": (0, 6), "mid_write": (0, 1), "after_commit": (3, 6), "mid_rename": (3, 5)}
"""Crash point -> (SR rows committed, pending files left) by the killed worker (6 instances: two chunks of 3 on the
CPU, and it dies in the first). Each report has its heatmap object (``[heatmap] pacs_object``, the default), written
and renamed before it: two files per row."""


def _rows_and_files(harness) -> tuple[dict[str, str], list[Path]]:
    """The files of the SR rows (SOP Instance UID -> path: each report and its heatmap object) and every file
    under sr_dir."""
    with harness.sessions() as session:
        rows = {uid: path for uid, path in session.execute(select(db.SRDocument.sop_instance_uid, db.SRDocument.path))}
        heatmaps = select(db.SRDocument.heatmap_sop_instance_uid, db.SRDocument.heatmap_path)
        rows.update({uid: path for uid, path in session.execute(heatmaps) if uid is not None})
    sr_dir = Path(harness.config["storage"]["sr_dir"])
    return rows, sorted(p for p in sr_dir.rglob("*") if p.is_file())


@pytest.mark.parametrize("point", sorted(POINTS))
def test_a_worker_killed_at_any_point_leaves_one_sr_file_per_row_after_recovery(make_harness, point: str) -> None:
    harness = make_harness()
    assert harness.send([chest_dataset(seed=i) for i in range(6)]) == [0] * 6
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    killed = subprocess.run(
        [sys.executable, "-c", CRASHING_WORKER, str(config), point], capture_output=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr.decode(errors="replace")[-3000:]

    committed, left = POINTS[point]
    rows, before = _rows_and_files(harness)
    assert len(rows) == 2 * committed
    finals = {p for p in before if p.parent.name != srfiles.PENDING_DIR}
    assert len(before) - len(finals) == left, before
    assert finals <= set(map(Path, rows.values())), "no final file without its committed row"
    server.recover(harness.settings, harness.engine)
    rows, after = _rows_and_files(harness)
    assert len(rows) == 2 * committed
    assert sorted(map(Path, rows.values())) == after, "exactly the committed reports, at their rows' paths"

    assert harness.work() == 6 - committed
    assert [r["status"] for r in harness.rows()] == ["ok"] * 6
    rows, last = _rows_and_files(harness)
    assert len(rows) == 12 and sorted(map(Path, rows.values())) == last
    with harness.sessions() as session:
        assert len(session.scalars(select(db.PredictionRecord)).all()) == 6


def test_a_commit_that_raised_after_committing_keeps_its_srs(make_harness, monkeypatch) -> None:
    """A connection lost during COMMIT: the transaction committed, the recorder saw an error. The reports' rows
    exist, so their files are renamed into place, not deleted with the outcomes it takes as unrecorded."""
    harness = make_harness()
    assert harness.send([chest_dataset(seed=i) for i in range(3)]) == [0] * 3
    publish, calls = srfiles.publish, []

    def fail_once(moves):  # raised right after the commit, as the commit's own error would be
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("connection lost")
        return publish(moves)

    monkeypatch.setattr(srfiles, "publish", fail_once)
    assert harness.work() == 3
    rows, found = _rows_and_files(harness)
    assert len(rows) == 6 and sorted(map(Path, rows.values())) == found
    assert [r["status"] for r in harness.rows()] == ["ok"] * 3


def test_pending_files_are_settled_by_their_writers_fate(harness) -> None:
    sr_dir = Path(harness.config["storage"]["sr_dir"]).resolve()
    data = b"report bytes"
    alive = jobqueue.new_worker_id(os.getppid())  # a process that runs (this test's parent)
    dead = jobqueue.new_worker_id(99999999)  # no such process on this host
    assert jobqueue.is_dead_local_worker(dead) and not jobqueue.is_dead_local_worker(alive)
    other_host = "another-host:123:456:abcdef01"

    def pending(uid: str, writer: str, age: float = 0.0) -> Path:
        path = srfiles.write_pending(srfiles.final_path(sr_dir, "1.2.3", uid), data, writer)
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    committed = pending("1.9.1", alive)  # committed, its writer not yet through its rename
    committed_dead = pending("1.9.2", dead)
    live = pending("1.9.3", alive)  # between its write and its commit
    orphan = pending("1.9.4", dead)
    remote = pending("1.9.5", other_host)
    remote_old = pending("1.9.6", other_host, age=srfiles.ABANDONED_AFTER + 60)
    stray = sr_dir / srfiles.PENDING_DIR / "not-a-report"
    stray.write_bytes(data)
    instance = _an_instance(harness)
    with harness.sessions() as session, session.begin():
        for uid in ("1.9.1", "1.9.2"):
            session.add(_row(instance, uid, srfiles.final_path(sr_dir, "1.2.3", uid)))

    settled = srfiles.settle_pending(sr_dir, harness.sessions)
    assert settled == srfiles.Settled(renamed=2, deleted=2, kept=3)
    for path in (committed, committed_dead, orphan, remote_old):
        assert not path.exists()
    assert live.exists() and remote.exists() and stray.exists()
    assert srfiles.final_path(sr_dir, "1.2.3", "1.9.1").read_bytes() == data
    assert srfiles.final_path(sr_dir, "1.2.3", "1.9.2").read_bytes() == data


def test_a_reader_of_a_committed_row_completes_its_rename(tmp_path: Path) -> None:
    final = srfiles.final_path(tmp_path, "1.2.3", "1.9.7")
    assert not srfiles.ensure_final(final), "nothing written"
    pending = srfiles.write_pending(final, b"report", jobqueue.new_worker_id())
    assert srfiles.ensure_final(final) and final.read_bytes() == b"report" and not pending.exists()
    assert srfiles.ensure_final(final), "already in place"


def test_report_files_without_a_row_are_swept_once_old(harness) -> None:
    sr_dir = Path(harness.config["storage"]["sr_dir"]).resolve()
    old = time.time() - srfiles.ABANDONED_AFTER - 60

    def report(uid: str, age: float | None = old, name: str | None = None) -> Path:
        path = srfiles.final_path(sr_dir, "1.2.4", uid)
        path = path.with_name(name) if name else path
        files.write_atomic(path, b"report")
        if age is not None:
            os.utime(path, (age, age))
        return path

    kept = report("1.8.1")  # old, with its row
    orphan = report("1.8.2")  # old, no row: an older release's crash
    young = report("1.8.3", age=None)  # no row yet: an older release's worker may be about to commit it
    temporary = report("x", name=f"{files.TEMP_PREFIX}abc123")
    foreign = report("x", name="notes.txt")
    with harness.sessions() as session, session.begin():
        session.add(_row(_an_instance(harness), "1.8.1", sr_dir / "elsewhere" / "1.8.1.dcm"))  # sr_dir moved

    assert srfiles.sweep_orphans(sr_dir, harness.sessions) == 2
    assert kept.exists() and young.exists() and foreign.exists()
    assert not orphan.exists() and not temporary.exists()


@pytest.mark.slow
def test_sigkill_at_random_points_of_a_burst_loses_nothing_and_leaves_no_orphan(tmp_path: Path) -> None:
    seed = int(os.environ.get("CXR_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash test seed: {seed} (rerun with CXR_CRASH_SEED={seed})")
    report = crash.run_crashes(tmp_path, runs=3, seed=seed)
    print(report.summary())
    assert report.problems == [], f"seed {seed}: {report.problems}\n{report.summary()}"
    assert report.kills == 3 and report.instances >= 16


def _an_instance(harness) -> db.Instance:
    if not harness.rows():
        assert harness.send([chest_dataset(seed=42)]) == [0]
    with harness.sessions() as session:
        return session.scalars(select(db.Instance)).first()


def _row(instance: db.Instance, uid: str, path: Path) -> db.SRDocument:
    return db.SRDocument(
        instance_id=instance.id,
        sop_instance_uid=uid,
        series_instance_uid="1.2.5",
        path=str(path),
        model_version="tiny-test",
        created_at=db.utcnow(),
    )
