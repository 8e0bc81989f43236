"""Workers: exclusive claims (also from concurrent processes' connections), leases and attempts, errors, the
missing model, worklist flags, Structured Reports (with the previous SR referenced) and study aggregation."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
from pathlib import Path

import pydicom
import pytest
from conftest import chest_dataset, save_dataset
from sqlalchemy import select

from cxr_triage.core import db
from cxr_triage.ops import retention
from cxr_triage.queue import jobqueue
from cxr_triage.triage import pipeline, studies, worker


def test_claims_are_exclusive_across_concurrent_connections(harness) -> None:
    statuses = harness.send([chest_dataset(seed=i) for i in range(12)])
    assert statuses == [0] * 12
    url = harness.config["database"]["url"]
    claimed: dict[str, list[int]] = {}

    def claim(name: str) -> None:
        engine = db.make_engine(url)  # its own pool, as another process would have
        sessions = db.session_factory(engine)
        mine: list[int] = []
        while jobs := jobqueue.claim(sessions, name, 2, 600, 3):
            mine += [job.id for job in jobs]
        claimed[name] = mine
        engine.dispose()

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [job for jobs in claimed.values() for job in jobs]
    assert sorted(every) == sorted(set(every)), "no job claimed twice"
    assert len(every) == 12
    with harness.sessions() as session:
        rows = session.scalars(select(db.Instance)).all()
    assert all(r.status == db.PROCESSING and r.attempts == 1 and r.lease_until is not None for r in rows)


def test_expired_lease_is_retried_then_failed_after_max_attempts(harness) -> None:
    harness.send([chest_dataset()])
    sessions = harness.sessions
    now = db.utcnow()
    first = jobqueue.claim(sessions, "dead-1", 5, lease_seconds=60, max_attempts=2, now=now)
    assert [j.attempts for j in first] == [1]
    assert jobqueue.claim(sessions, "other", 5, 60, 2, now=now + dt.timedelta(seconds=30)) == [], "lease held"
    second = jobqueue.claim(sessions, "dead-2", 5, 60, 2, now=now + dt.timedelta(seconds=61))
    assert [j.attempts for j in second] == [2]
    assert jobqueue.claim(sessions, "dead-3", 5, 60, 2, now=now + dt.timedelta(seconds=200)) == []
    row = harness.rows()[0]
    assert row["status"] == "error"
    assert "lease expired" in row["reason"]


def test_processing_error_is_retried_and_recorded(make_harness) -> None:
    harness = make_harness(worker={"max_attempts": 2})
    harness.send([chest_dataset()])
    with harness.sessions() as session:
        path = Path(session.scalars(select(db.Instance.spool_path)).one())
    path.unlink()
    harness.work()
    row = harness.rows()[0]
    assert row["status"] == "error"
    assert "spool file" in row["reason"] and "missing" in row["reason"]
    with harness.sessions() as session:
        assert session.scalars(select(db.Instance.attempts)).one() == 2


def test_missing_model_keeps_instances_queued_until_a_model_appears(make_harness, tiny_model: Path, caplog) -> None:
    harness = make_harness(model=None)
    assert harness.send([chest_dataset(seed=1), chest_dataset(seed=2)]) == [0, 0]
    with caplog.at_level("WARNING"):
        assert harness.work() == 0
    assert "NO MODEL" in caplog.text
    assert [r["status"] for r in harness.rows()] == ["queued", "queued"]
    shutil.copy(tiny_model, harness.config["model"]["path"])
    assert harness.work() == 2
    assert [r["status"] for r in harness.rows()] == ["ok", "ok"]
    with harness.sessions() as session:
        versions = session.scalars(select(db.ModelVersion)).all()
    assert [(v.version, v.active) for v in versions] == [("tiny-test", True)]


def test_prediction_record_flags_and_timings(make_harness) -> None:
    harness = make_harness(triage={"covid_threshold": 0.0, "pneumonia_threshold": 1.0})
    harness.send([chest_dataset()])
    harness.work()
    row = harness.rows()[0]
    assert row["flagged"] is True
    assert row["reason"].startswith("P(covid)=")
    with harness.sessions() as session:
        prediction = session.scalars(select(db.PredictionRecord)).one()
    assert prediction.device == "cpu"
    assert prediction.total_ms >= prediction.inference_ms > 0
    assert len(prediction.model_sha256) == 64
    assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-4


def test_one_sr_per_instance_and_a_rerun_references_the_previous_sr(harness) -> None:
    ds = chest_dataset(seed=5)
    harness.send([ds])
    harness.work()
    first_uid = harness.rows()[0]["sr_sop_instance_uid"]
    # The same instance again with different bytes (a conflict) is processed too, superseding the first SR.
    changed = pydicom.dcmread(save_dataset(ds, harness.tmp / "v2.dcm"))
    changed.InstanceNumber = 2
    harness.send([changed])
    harness.work()
    with harness.sessions() as session:
        srs = session.scalars(select(db.SRDocument).order_by(db.SRDocument.id)).all()
    assert [s.sop_instance_uid for s in srs][0] == first_uid
    assert len(srs) == 2
    assert srs[1].previous_sr_id == srs[0].id
    assert srs[0].series_instance_uid == srs[1].series_instance_uid, "one SR series per study and model version"
    second = pydicom.dcmread(srs[1].path)
    assert second.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert second.StudyInstanceUID == ds.StudyInstanceUID
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first_uid
    assert Path(srs[0].path).is_file() and Path(srs[0].path).is_relative_to(Path(harness.config["storage"]["sr_dir"]))


def test_study_is_aggregated_after_the_quiet_period(make_harness) -> None:
    harness = make_harness(
        worker={"study_quiet_seconds": 3600}, triage={"covid_threshold": 0.0, "pneumonia_threshold": 1.0}
    )
    study = pydicom.uid.generate_uid()
    items = [chest_dataset(seed=1, StudyInstanceUID=study), chest_dataset(seed=2, StudyInstanceUID=study)]
    items.append(chest_dataset(seed=3, StudyInstanceUID=study, ViewPosition="LL"))
    harness.send(items)
    harness.work()
    with harness.sessions() as session:
        row = session.scalars(select(db.Study)).one()
    assert row.status == "open", "still inside the quiet period"
    completed = studies.aggregate_studies(harness.sessions, 3600, now=db.utcnow() + dt.timedelta(hours=2))
    assert completed == [study]
    with harness.sessions() as session:
        row = session.scalars(select(db.Study)).one()
    assert row.status == "complete" and row.completed_at is not None
    assert row.summary["instances"] == 3
    assert row.summary["classified"] == 2 and row.summary["refused"] == 1
    assert row.flagged and row.label in ("covid", "normal", "pneumonia")
    probabilities = [r["probabilities"]["covid"] for r in harness.rows() if r["probabilities"]]
    assert abs(row.summary["max_probabilities"]["covid"] - max(probabilities)) < 1e-5
    # A late instance reopens the study.
    harness.send([chest_dataset(seed=4, StudyInstanceUID=study)])
    with harness.sessions() as session:
        assert session.scalars(select(db.Study.status)).one() == "open"


def test_study_waits_for_unfinished_instances(make_harness) -> None:
    harness = make_harness(model=None)
    harness.send([chest_dataset()])
    assert studies.aggregate_studies(harness.sessions, 0, now=db.utcnow() + dt.timedelta(hours=1)) == []


def test_stopping_releases_claimed_jobs_without_counting_the_attempt(harness) -> None:
    harness.send([chest_dataset(seed=1), chest_dataset(seed=2)])
    jobs = jobqueue.claim(harness.sessions, harness.worker.worker_id, 5, 600, 3)
    assert len(jobs) == 2
    assert jobqueue.release(harness.sessions, harness.worker.worker_id) == 2
    with harness.sessions() as session:
        rows = session.scalars(select(db.Instance)).all()
    assert [(r.status, r.attempts, r.claimed_by) for r in rows] == [(db.QUEUED, 0, None)] * 2


def test_jobs_of_dead_local_worker_processes_are_released(harness) -> None:
    harness.send([chest_dataset()])
    import socket

    dead_owner = f"{socket.gethostname()}:999999999:deadbeef"
    assert len(jobqueue.claim(harness.sessions, dead_owner, 5, 600, 3)) == 1
    assert jobqueue.release_dead_local_workers(harness.sessions) == 1
    assert harness.rows()[0]["status"] == "queued"
    assert harness.work() == 1


def test_a_zombie_or_a_reused_pid_does_not_keep_a_dead_workers_jobs(harness) -> None:
    import socket
    import subprocess
    import time

    harness.send([chest_dataset(seed=1), chest_dataset(seed=2), chest_dataset(seed=3)])
    child = subprocess.Popen(["sleep", "1"])  # not reaped until wait(): a zombie once it exits
    try:
        zombie_owner = jobqueue.new_worker_id(child.pid)
        reused_owner = f"{socket.gethostname()}:{os.getppid()}:1:0reused0"  # a live PID, but started at tick 1
        live_owner = jobqueue.new_worker_id(os.getppid())  # pytest's parent: alive throughout
        for owner in (zombie_owner, reused_owner, live_owner):
            assert len(jobqueue.claim(harness.sessions, owner, 1, 600, 3)) == 1
        deadline = time.monotonic() + 60
        while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        released = jobqueue.release_dead_local_workers(harness.sessions)
    finally:
        child.wait()
    # kill(pid, 0) calls a zombie alive; the process's state and start time (from /proc) do not.
    assert released == 2
    assert sorted(r["status"] for r in harness.rows()) == ["processing", "queued", "queued"]


def test_sr_failure_keeps_the_classification(harness, monkeypatch) -> None:
    from cxr_triage.outputs import sr

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("evidence lacks something")

    monkeypatch.setattr(sr, "build_triage_sr", broken)
    harness.send([chest_dataset()])
    harness.work()
    row = harness.rows()[0]
    assert row["status"] == "ok" and row["label"] and row["sr_sop_instance_uid"] is None
    assert "Structured Report not written" in row["reason"]


def test_worker_command_processes_the_queue(make_harness) -> None:
    from conftest import write_config

    from cxr_triage.cli import main

    harness = make_harness()
    harness.send([chest_dataset(seed=1), chest_dataset(seed=2, ViewPosition="LL")])
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    assert main(["worker", "--once", "--config", str(config)]) == 0
    assert sorted(r["status"] for r in harness.rows()) == ["ok", "rejected"]


def test_two_versions_in_one_chunk_are_recorded_in_order_with_the_first_sr_superseded(harness) -> None:
    ds = chest_dataset(seed=6)
    changed = pydicom.dcmread(save_dataset(ds, harness.tmp / "v2.dcm"))
    changed.InstanceNumber = 2
    other = chest_dataset(seed=7, StudyInstanceUID=ds.StudyInstanceUID)
    assert harness.send([ds, changed, other]) == [0, 0, 0]
    assert harness.work() == 3
    with harness.sessions() as session:
        srs = session.scalars(select(db.SRDocument).order_by(db.SRDocument.id)).all()
        owners = [session.get(db.Instance, s.instance_id).sop_instance_uid for s in srs]
    assert owners == [ds.SOPInstanceUID, ds.SOPInstanceUID, other.SOPInstanceUID]
    assert [s.previous_sr_id for s in srs] == [None, srs[0].id, None]
    assert len({s.series_instance_uid for s in srs}) == 1, "one SR series per study and model version"
    second = pydicom.dcmread(srs[1].path)
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == srs[0].sop_instance_uid
    assert all(Path(s.path).is_file() for s in srs)


def test_a_result_for_a_job_no_longer_held_is_discarded_with_its_sr(harness) -> None:
    from sqlalchemy import update

    harness.send([chest_dataset(seed=8)])
    w = harness.worker
    assert w.ensure_model()
    jobs = jobqueue.claim(harness.sessions, w.worker_id, 5, 600, 3)
    with harness.sessions() as session, session.begin():  # the lease expired and another worker took the job
        session.execute(update(db.Instance).values(claimed_by="someone-else"))
    w.process(jobs, w.predictor)
    w.close()
    with harness.sessions() as session:
        assert session.scalars(select(db.Instance.status)).one() == db.PROCESSING
        assert session.scalars(select(db.SRDocument)).all() == []
    sr_files = [p for p in Path(harness.config["storage"]["sr_dir"]).rglob("*") if p.is_file()]
    assert sr_files == [], "the discarded SR file is removed (pending or final)"


def test_chunks_are_as_even_as_the_limit_allows() -> None:
    assert pipeline.chunk_sizes(0, 4) == []
    assert pipeline.chunk_sizes(3, 4) == [3]
    assert pipeline.chunk_sizes(5, 4) == [3, 2]
    assert pipeline.chunk_sizes(8, 4) == [4, 4]
    assert pipeline.chunk_sizes(9, 4) == [3, 3, 3]
    assert pipeline.chunk_sizes(16, 1) == [1] * 16
    for count in range(1, 40):
        sizes = pipeline.chunk_sizes(count, 4)
        assert sum(sizes) == count and max(sizes) <= 4 and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-count // 4)


def test_an_idle_worker_is_woken_by_the_listener_instead_of_waiting_for_its_poll(make_harness) -> None:
    harness = make_harness(worker={"poll_interval": 3600})
    wake = threading.Event()
    queued: list[int] = []
    harness.listener.receiver.on_queued = lambda: (queued.append(1), wake.set())
    runner = worker.Worker(harness.settings, harness.engine, wake=wake)
    idle = threading.Event()
    waiting = runner.idle

    def idle_and_tell(interval: float) -> None:
        idle.set()
        waiting(interval)

    runner.idle = idle_and_tell  # type: ignore[method-assign]
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        assert idle.wait(120), "the worker loaded its model, found nothing and went idle (for an hour)"
        ds = chest_dataset(seed=31)
        assert harness.send([ds, ds]) == [0, 0]
        assert queued == [1], "woken once: the second copy is a duplicate, not a new job"
        done = threading.Event()
        for _ in range(600):  # up to a minute, against a poll interval of an hour
            if harness.rows()[0]["status"] == "ok":
                done.set()
                break
            done.wait(0.1)
        assert done.is_set(), "the instance was classified without waiting for the next poll"
    finally:
        runner.stop.set()
        wake.set()
        thread.join(60)
    assert not thread.is_alive()


def test_worker_processes_let_idle_openmp_threads_sleep_unless_told_otherwise() -> None:
    import os
    import subprocess
    import sys

    code = (
        "import sys, os\n"
        "import cxr_triage.triage.worker as w\n"
        "assert 'torch' not in sys.modules, 'the worker module must not load torch before the policy is set'\n"
        "w.quiet_openmp_threads()\n"
        "print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "PASSIVE"
    chosen = subprocess.run(
        [sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True
    )
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == "ACTIVE", "an operator's own setting is kept"


def test_stop_between_chunks_records_the_classified_chunk_and_releases_the_prepared_one(harness) -> None:
    assert harness.send([chest_dataset(seed=40 + i) for i in range(2 * worker.CPU_CHUNK)]) == [0] * 8
    w = harness.worker
    assert w.ensure_model()
    jobs = jobqueue.claim(harness.sessions, w.worker_id, 16, 600, 3)
    hand_over = w._hand_to_recorder

    def classify_then_stop(outcomes) -> None:  # type: ignore[no-untyped-def]
        hand_over(outcomes)
        w.stop.set()  # e.g. SIGTERM while the next chunk was being prepared

    w._hand_to_recorder = classify_then_stop  # type: ignore[method-assign]
    w.process(jobs, w.predictor)
    w.close()
    assert jobqueue.release(harness.sessions, w.worker_id) == worker.CPU_CHUNK
    with harness.sessions() as session:
        rows = session.scalars(select(db.Instance).order_by(db.Instance.id)).all()
    assert [r.status for r in rows] == [db.DONE] * 4 + [db.QUEUED] * 4
    assert [r.attempts for r in rows[4:]] == [0] * 4, "the interrupted attempt is not counted"
    w.stop.clear()
    w._hand_to_recorder = hand_over  # type: ignore[method-assign]
    assert harness.work() == 4
    assert [r["status"] for r in harness.rows()] == ["ok"] * 8


def test_spool_retention_deletes_only_files_of_instances_finished_long_enough_ago(harness) -> None:
    ok, lateral, later = chest_dataset(seed=50), chest_dataset(seed=51, ViewPosition="LL"), chest_dataset(seed=52)
    assert harness.send([ok, lateral]) == [0, 0]
    assert harness.work() == 2
    assert harness.send([later]) == [0]  # still queued: kept whatever its age
    with harness.sessions() as session:
        rows = session.scalars(select(db.Instance).order_by(db.Instance.id)).all()
    paths = [Path(r.spool_path) for r in rows]
    assert all(p.is_file() for p in paths)
    now = db.utcnow()
    assert retention.purge_spool(harness.sessions, 7, now=now + dt.timedelta(days=6)) == 0
    assert retention.purge_spool(harness.sessions, 0, now=now + dt.timedelta(days=365)) == 0, "0 keeps every file"
    assert retention.purge_spool(harness.sessions, 7, now=now + dt.timedelta(days=8)) == 2
    assert [p.is_file() for p in paths] == [False, False, True]
    results = harness.rows()
    assert [r["spool_removed_at"] is not None for r in results] == [True, True, False]
    assert [r["status"] for r in results] == ["ok", "rejected", "queued"], "the results stay"
    assert retention.purge_spool(harness.sessions, 7, now=now + dt.timedelta(days=9)) == 0, "each file once"
    assert harness.send([ok]) == [0], "the same bytes again are still a no-op"
    assert len(harness.rows()) == 3
    assert harness.work() == 1
    assert [r["status"] for r in harness.rows()] == ["ok", "rejected", "ok"]


def test_spool_retention_leaves_an_undeletable_file_for_the_next_round(harness, monkeypatch) -> None:
    assert harness.send([chest_dataset(seed=53)]) == [0]
    assert harness.work() == 1
    later = db.utcnow() + dt.timedelta(days=30)

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", refuse)
        assert retention.purge_spool(harness.sessions, 7, now=later) == 0
    assert harness.rows()[0]["spool_removed_at"] is None
    assert retention.purge_spool(harness.sessions, 7, now=later) == 1
    assert harness.rows()[0]["spool_removed_at"] is not None


def test_worker_and_serve_take_the_model_on_the_command_line(make_harness, tiny_model: Path) -> None:
    from conftest import write_config

    from cxr_triage.cli import main

    harness = make_harness(model=None)  # the configuration names a model that does not exist
    harness.send([chest_dataset(seed=61)])
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    assert main(["worker", "--once", "--config", str(config)]) == 0
    assert [r["status"] for r in harness.rows()] == ["queued"]
    assert main(["worker", "--once", "--config", str(config), "--model", str(tiny_model)]) == 0
    (row,) = harness.rows()
    assert row["status"] == "ok" and row["model_version"] == "tiny-test"


def test_a_database_that_is_down_is_logged_once_and_retried_with_back_off(harness, monkeypatch, caplog) -> None:
    import logging

    from sqlalchemy.exc import OperationalError

    w = harness.worker
    calls: list[int] = []

    def run_once() -> int:
        calls.append(1)
        if len(calls) >= 8:
            w.stop.set()
        if len(calls) == 6:
            return 0  # the database is back for one poll
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    waits: list[float] = []
    monkeypatch.setattr(w, "run_once", run_once)
    monkeypatch.setattr(w, "idle", waits.append)
    with caplog.at_level(logging.INFO, logger="cxr_triage.worker"):
        w.run()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, "once when it fails, once more when it fails again after recovering"
    assert all(r.exc_info for r in errors)
    assert any("works again after 5 failed attempt(s)" in r.getMessage() for r in caplog.records)
    poll = harness.settings.worker.poll_interval
    assert waits == [worker.retry_interval(poll, n) for n in (1, 2, 3, 4, 5, 0, 1, 2)]
    assert waits[:5] == sorted(waits[:5]) and waits[5] == poll
    assert worker.retry_interval(0.5, 100) == worker.MAX_RETRY_INTERVAL == 30.0


def test_a_failing_housekeeping_job_is_logged_once_per_change(caplog) -> None:
    import logging

    from cxr_triage.ops import housekeeping

    outcomes = iter([OSError("disk gone")] * 50 + [None, OSError("disk gone")])

    def job() -> None:
        error = next(outcomes)
        if error:
            raise error

    guarded = housekeeping._guarded("spool retention", job)
    with caplog.at_level(logging.INFO, logger="cxr_triage.housekeeping"):
        for _ in range(52):
            guarded()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages == [
        ("ERROR", "housekeeping: spool retention failed (retried; the same error is not logged again)"),
        ("WARNING", "housekeeping: spool retention works again after 50 failed attempt(s)"),
        ("ERROR", "housekeeping: spool retention failed (retried; the same error is not logged again)"),
    ]


@pytest.mark.parametrize(
    ("processes", "threads", "cores", "cuda", "expected"),
    [
        ("auto", "auto", 2, False, (2, 1)),
        ("auto", "auto", 16, False, (8, 2)),
        ("auto", "auto", 1, False, (1, 1)),
        ("auto", "auto", 16, True, (1, 16)),
        (3, "auto", 16, False, (3, 5)),
        ("auto", 2, 6, False, (6, 2)),
        (0, "auto", 4, False, (0, 4)),
    ],
)
def test_worker_layout_shares_the_cores(processes, threads, cores, cuda, expected) -> None:
    from cxr_triage.triage.worker import worker_layout

    assert worker_layout(processes, threads, cores, cuda) == expected


@pytest.mark.parametrize("values", [{"processes": -1}, {"threads": 0}, {"processes": "two"}, {"threads": True}])
def test_worker_counts_are_validated(values) -> None:
    from cxr_triage.core.settings import WorkerSettings

    with pytest.raises(ValueError, match='"auto" or a whole number'):
        WorkerSettings(**values)


def test_thumbnail_is_the_model_input_as_8_bit_grey() -> None:
    import io

    import numpy as np
    import torch
    from PIL import Image

    tensor = torch.linspace(-0.1, 1.1, 3 * 224 * 224).reshape(3, 224, 224)
    png = pipeline.thumbnail_png(tensor, chest_dataset())
    assert png is not None
    pixels = np.asarray(Image.open(io.BytesIO(png)))
    assert pixels.shape == (224, 224) and pixels.dtype == np.uint8
    expected = (tensor[0].clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    assert np.array_equal(pixels, expected)
