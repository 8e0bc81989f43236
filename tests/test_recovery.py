"""Crash recovery with the real `cxr-triage serve` process: instances acknowledged before a SIGKILL (and a spool
file written just before a crash, with no database row yet) are all classified after a restart; an incomplete
temporary spool file and an SR file a killed worker wrote but never committed are removed; SIGTERM stops the
server cleanly. (SR files at every crash point, and SIGKILLs in the middle of bursts: tests/test_crash.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import chest_dataset, config_values, echo, save_dataset, send, write_config
from sqlalchemy import select

from cxr_triage import files
from cxr_triage.commands.results import records
from cxr_triage.core import db
from cxr_triage.outputs import srfiles
from cxr_triage.queue import jobqueue, spool
from cxr_triage.testing.peers import tail, terminate, wait_until


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "cxr_triage", "--log-level", "INFO", "serve", "--config", str(config)]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=config.parent, start_new_session=True)
    return proc


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    def ready() -> bool:
        assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{tail(log)}"
        return echo(port) == 0

    wait_until(ready, 60, "cxr-triage serve to answer C-ECHO")


def _rows(url: str) -> list[dict]:
    engine = db.make_engine(url)
    try:
        with db.read_session(engine) as session:
            return list(records(session))
    finally:
        engine.dispose()


def _heatmaps(url: str) -> set[str | None]:
    """The heatmap objects' SOP Instance UIDs of the SR rows (None for a report without one)."""
    engine = db.make_engine(url)
    try:
        with db.read_session(engine) as session:
            return set(session.scalars(select(db.SRDocument.heatmap_sop_instance_uid)).all())
    finally:
        engine.dispose()


def test_acknowledged_instances_survive_sigkill(tmp_path: Path, tiny_model: Path) -> None:
    values = config_values(tmp_path, tiny_model, worker={"processes": 0})
    config = write_config(tmp_path / "cxr.toml", values)
    port = values["listener"]["port"]
    url = values["database"]["url"]
    log = tmp_path / "serve.log"

    proc = _start(config, log)
    try:
        _wait_ready(proc, port, log)
        sent = [chest_dataset(seed=i) for i in range(4)]
        assert send(port, sent) == [0] * 4
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert [r["status"] for r in _rows(url)] == ["queued"] * 4, "acknowledged means recorded"

    # A crash between the spool rename and the database insert leaves a spool file without a row,
    # and a crash during the write leaves a temporary file.
    orphan = chest_dataset(seed=99)
    data = save_dataset(orphan, tmp_path / "orphan.dcm").read_bytes()
    files.write_atomic(
        spool.spool_path(values["storage"]["spool_dir"], orphan.SOPInstanceUID, spool.sha256_bytes(data)), data
    )
    stale = Path(values["storage"]["spool_dir"]) / "ab" / f"{files.TEMP_PREFIX}crashed"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"partial")
    # A worker killed between its SR write and its commit leaves a pending SR (patient data) without a row.
    uncommitted = srfiles.final_path(Path(values["storage"]["sr_dir"]).resolve(), orphan.StudyInstanceUID, "1.2.3.4")
    uncommitted = srfiles.write_pending(uncommitted, b"report", jobqueue.new_worker_id(99999999))

    values["worker"]["processes"] = 1
    write_config(config, values)
    proc = _start(config, log)
    try:
        _wait_ready(proc, port, log)
        done = wait_until(
            lambda: (rows := _rows(url)) and all(r["status"] == "ok" for r in rows) and len(rows) == 5 and rows,
            90,
            "every instance to be classified after the restart",
            interval=0.5,
        )
    finally:
        code = terminate(proc, timeout=60, group=True)
    expected = {str(ds.SOPInstanceUID) for ds in [*sent, orphan]}
    assert {r["sop_instance_uid"] for r in done} == expected
    assert all(r["sr_sop_instance_uid"] for r in done)
    assert not stale.exists()
    assert not uncommitted.exists()
    sr_files = {p for p in Path(values["storage"]["sr_dir"]).rglob("*") if p.is_file()}
    expected_files = {f"{uid}.dcm" for uid in [*(r["sr_sop_instance_uid"] for r in done), *_heatmaps(url)] if uid}
    assert {p.name for p in sr_files} == expected_files, "one SR file per row, and its heatmap object"
    assert code == 0, tail(log)
    text = log.read_text()
    assert "recovered spool file" in text
    assert "SR files left by a crash: 0 committed renamed into place, 1 never committed deleted" in text
    assert "stopped" in text
    assert "Test^Phantom" not in text, "logs carry UIDs, never patient names"
    assert " highdicom" not in text, "highdicom's per-SR INFO lines are kept out of INFO logs"
    assert " alembic" not in text, "Alembic's INFO lines on every start are kept out of INFO logs"


def test_serve_without_a_model_starts_and_keeps_instances_queued(tmp_path: Path) -> None:
    values = config_values(tmp_path, None, worker={"processes": 1})
    config = write_config(tmp_path / "cxr.toml", values)
    log = tmp_path / "serve.log"
    proc = _start(config, log)
    try:
        _wait_ready(proc, values["listener"]["port"], log)
        assert send(values["listener"]["port"], [chest_dataset()]) == [0]
        wait_until(lambda: "NO MODEL - received" in log.read_text(), 60, "the worker process's no-model warning")
        time.sleep(0.5)  # a few polls of the worker
        assert [r["status"] for r in _rows(values["database"]["url"])] == ["queued"]
    finally:
        code = terminate(proc, timeout=60, group=True)
    assert code == 0
    assert "NO MODEL" in log.read_text()


CRASHING_DECODER = '''
"""Loaded by every Python of this test (PYTHONPATH): a decoder that crashes the worker process on one file."""
import ctypes

from cxr_triage.triage import pipeline

_preprocess = pipeline.preprocess


def preprocess(jobs, stop, *args, **kwargs):
    for job in jobs:
        with open(job.spool_path, "rb") as file:
            if b"CRASH-ME" in file.read():
                ctypes.string_at(0)  # a read of address 0 inside C code: SIGSEGV, as a faulty decoder would
    return _preprocess(jobs, stop, *args, **kwargs)


pipeline.preprocess = preprocess
'''


@pytest.mark.slow
def test_a_file_that_crashes_its_worker_fails_after_its_attempts_and_spares_its_batch(
    tmp_path: Path, tiny_model: Path
) -> None:
    values = config_values(tmp_path, tiny_model, worker={"processes": 1, "max_attempts": 3, "claim_batch": 8})
    config = write_config(tmp_path / "cxr.toml", values)
    port, url = values["listener"]["port"], values["database"]["url"]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(CRASHING_DECODER)
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "cxr_triage", "--log-level", "INFO", "serve", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    crasher = chest_dataset(seed=7, PatientID="CRASH-ME")
    good = [chest_dataset(seed=i) for i in range(3)]
    try:
        _wait_ready(proc, port, log)
        wait_until(lambda: "taking jobs from the queue" in log.read_text(), 90, "the worker to be ready")
        assert send(port, [good[0], crasher, *good[1:]]) == [0] * 4

        def settled() -> list[db.Instance] | None:
            engine = db.make_engine(url)
            try:
                with db.read_session(engine) as session:
                    rows = list(session.scalars(select(db.Instance).order_by(db.Instance.id)))
            finally:
                engine.dispose()
            return rows if all(r.status in (db.DONE, db.FAILED) for r in rows) else None

        rows = wait_until(settled, 240, "every instance to be classified or failed", interval=0.5)
        assert proc.poll() is None, "the listener outlives its crashing workers"
        assert echo(port) == 0
    finally:
        code = terminate(proc, timeout=60, group=True)
    by_uid = {r.sop_instance_uid: r for r in rows}
    bad = by_uid.pop(str(crasher.SOPInstanceUID))
    assert (bad.status, bad.attempts, bad.interruptions) == (db.FAILED, 3, 3)
    assert bad.error.startswith("crashed the worker: worker process cxr-worker-0 died (killed by SIGSEGV)"), bad.error
    assert {r.status for r in by_uid.values()} == {db.DONE} and len(by_uid) == 3, "its batch is not blamed"
    assert code == 0, tail(log)
    text = log.read_text()
    assert text.count("exited with -11; restarting") == 3, tail(log)
    assert "to be processed one at a time" in text
