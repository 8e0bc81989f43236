"""Scheduled retraining on the CPU with a tiny model (width 4) and tiny synthetic images whose class shows in their
brightness, so a few epochs learn it: feedback through the real listener and worklist -> a scheduled run -> a
challenger evaluated and promoted, the next image classified by it; a worse challenger (wrong labels) rejected;
too few labels skipped; a run killed mid-training leaves the champion; two schedulers on one PostgreSQL run the job
once, and the other takes over when the leader dies.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import config_values, write_config
from PIL import Image
from sqlalchemy import select
from synthetic_pack import synthetic_image, write_synthetic_pack

from cxr_triage import CLASS_NAMES
from cxr_triage.cli import main
from cxr_triage.core import db, schedlock
from cxr_triage.core.settings import Settings
from cxr_triage.ml import decision, registry
from cxr_triage.retrain import retraining
from cxr_triage.retrain.scheduler import SCHEDULER_LEASE, RetrainScheduler
from cxr_triage.testing.peers import wait_until
from cxr_triage.testing.synthetic import new_dataset

pytestmark = pytest.mark.xdist_group("retraining")  # one worker: the synthetic pack and champion built once

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = 15
"""Confirmed images per class in a run (45 in all)."""
RETRAIN = {
    "min_new_labels": 30,
    "replay_ratio": 1.0,
    "head_epochs": 8,
    "head_learning_rate": 3e-3,
    "epochs": 0,  # head only: the all-layer epochs are slow on the CPU (the kill test runs them)
    "learning_rate": 1e-3,
    "batch_size": 8,
    "validation_images": 64,
    "margin": 0.02,
    "sensitivity_tolerance": 0.2,
    "device": "cpu",
    "precision": "float32",
    "lock_seconds": 3.0,
    "nice": 0,
}


@dataclass(frozen=True)
class Data:
    pack: Path
    champion: Path
    thumbnails: list[tuple[Path, str]]  # PNG files of confirmed images with their true label


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """A base pack of 90 synthetic images (30 per class), 45 more as PNGs for feedback, a random tiny champion."""
    import torch

    from cxr_triage.ml.checkpoint import ModelCard, save_classifier
    from cxr_triage.ml.model import CAEClassifier, ModelSpec

    folder = tmp_path_factory.mktemp("retrain-data")
    pack = write_synthetic_pack(folder, "base", "b")
    thumbnails = []
    for i in range(3 * PER_CLASS):
        path = folder / "feedback" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(synthetic_image(i % 3, seed=1000 + i)).save(path)
        thumbnails.append((path, CLASS_NAMES[i % 3]))
    torch.manual_seed(7)
    model = CAEClassifier(ModelSpec(width=4, dense_units=32))  # 8 hidden units often die before they learn
    champion = folder / "champion.pt"
    card = ModelCard(spec=model.spec, model_version="tiny-champion-1", temperature=1.5)  # calibrated, as shipped
    save_classifier(champion, model, card)
    return Data(pack, champion, thumbnails)


def retrain_settings(data: Data, tmp: Path, **overrides: Any) -> dict[str, Any]:
    return {**RETRAIN, "base_pack": str(data.pack), "work_dir": str(tmp / "retrain"), **overrides}


def sessions_of(settings: Settings) -> Any:
    return db.session_factory(db.make_engine(settings.database.url))


def runs(engine_or_sessions: Any) -> list[db.RetrainRun]:
    sessions = engine_or_sessions if callable(engine_or_sessions) else db.session_factory(engine_or_sessions)
    with sessions() as session:
        return list(session.scalars(select(db.RetrainRun).order_by(db.RetrainRun.id)))


def seed_feedback(sessions: Any, images: list[tuple[Path, str]]) -> None:
    """A classified study per image whose model input is ``path``, with a radiologist's label (as the worklist
    stores them), without sending the images (the end-to-end test sends its own)."""
    from cxr_triage.web import worklist

    now = db.utcnow()
    with sessions() as session, session.begin():
        for index, (path, label) in enumerate(images):
            uid = f"2.25.{os.getpid()}{index}{time.monotonic_ns()}"
            study = db.Study(study_instance_uid=uid, first_received_at=now, last_received_at=now, status="complete")
            session.add(study)
            session.flush()
            session.add(
                db.Instance(
                    study_id=study.id, sop_instance_uid=f"{uid}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                    study_instance_uid=uid, transfer_syntax_uid="1.2.840.10008.1.2.1", spool_path=f"/spool/{uid}",
                    sha256="0" * 64, size_bytes=1, received_at=now, status=db.DONE, thumbnail_path=str(path),
                )
            )  # fmt: skip
            session.flush()
            worklist.record_feedback(session, uid, "rad1", label, None)


def register_champion(sessions: Any, path: Path) -> int:
    from cxr_triage.ml.checkpoint import load_classifier

    return registry.register_model(sessions, load_classifier(path))


# --- the decision rule, the schedule, the lease ----------------------------------------------------------------


def _summary(auc: float, sensitivities: tuple[float, float, float]) -> dict[str, Any]:
    per_class = {name: {"sensitivity": value} for name, value in zip(CLASS_NAMES, sensitivities, strict=True)}
    return {"macro_auc": auc, "per_class": per_class}


def test_the_decision_needs_the_margin_and_every_class_within_the_tolerance() -> None:
    champion = _summary(0.90, (0.80, 0.90, 0.85))
    assert decision.decide(champion, _summary(0.92, (0.81, 0.89, 0.85)), 0.01, 0.02).promote
    low = decision.decide(champion, _summary(0.905, (0.9, 0.9, 0.9)), 0.01, 0.02)
    assert not low.promote and "less than the margin 0.01" in low.reason
    dropped = decision.decide(champion, _summary(0.95, (0.77, 0.95, 0.95)), 0.01, 0.02)
    assert not dropped.promote and "covid sensitivity fell 0.0300" in dropped.reason
    assert dropped.figures["sensitivity"]["covid"]["change"] == pytest.approx(-0.03)
    assert not decision.decide(champion, _summary(0.90, (0.8, 0.9, 0.85)), 0.0, 0.02).promote, "equal is no better"
    undefined = decision.decide({"macro_auc": None}, _summary(0.9, (1, 1, 1)), 0.0, 1.0)
    assert not undefined.promote and "undefined" in undefined.reason


def test_the_schedule_is_crontab_with_sunday_as_day_0() -> None:
    import datetime as dt

    start = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)  # a Wednesday
    for line, weekday in (("0 2 * * 0", "Sunday"), ("0 2 * * 7", "Sunday"), ("30 1 * * 1-5", "Thursday")):
        fire = schedlock.crontab_trigger(line, "UTC").get_next_fire_time(None, start)
        assert fire.strftime("%A") == weekday, line
    assert schedlock.crontab_trigger("0 2 * * */2", "UTC").get_next_fire_time(None, start).strftime("%A") == "Thursday"
    with pytest.raises(ValueError):
        schedlock.crontab_trigger("0 2 * *", "")
    with pytest.raises(ValueError, match="schedule"):
        Settings.from_values(config_values(Path("/tmp"), None, retrain={"schedule": "61 * * * *"}))


def test_a_lease_is_held_by_one_and_freed_when_its_holder_stops_renewing(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'lease.sqlite'}")
    db.upgrade(engine)
    sessions = db.session_factory(engine)
    first, second = (schedlock.Lease(sessions, "x", schedlock.holder_id(), 3.0) for _ in range(2))
    assert first.acquire() and not second.acquire()
    assert first.acquire() and first.renew(), "the holder renews"
    wait_until(second.acquire, 30, "the second holder to take the expired lease", interval=0.5)
    assert not first.renew() and not first.holds() and second.holds()
    second.release()
    assert first.acquire()
    engine.dispose()


# --- end to end ------------------------------------------------------------------------------------------------


def _send_classes(harness: Any, count_per_class: int, seed: int) -> list[tuple[str, str]]:
    """Send synthetic images of every class through the listener; (study UID, true label) of each."""
    datasets, truth = [], []
    for i in range(3 * count_per_class):
        ds = new_dataset(synthetic_image(i % 3, seed=seed + i))
        datasets.append(ds)
        truth.append((str(ds.StudyInstanceUID), CLASS_NAMES[i % 3]))
    assert harness.send(datasets) == [0] * len(datasets)
    assert harness.work() == len(datasets)
    return truth


def _feedback(harness: Any, truth: list[tuple[str, str]], relabel: dict[str, str] | None = None) -> None:
    from cxr_triage.web import worklist

    with harness.sessions() as session, session.begin():
        for uid, label in truth:
            worklist.record_feedback(session, uid, "rad1", (relabel or {}).get(label, label), None)


def _latest_version(harness: Any) -> str:
    return harness.rows()[-1]["model_version"]


@pytest.mark.slow
def test_feedback_to_a_scheduled_promotion_then_a_worse_challenger_is_rejected_then_too_few_skip(
    make_harness: Any, data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One scenario read top to bottom: each run starts from what the one before left in the registry.
    harness = make_harness(
        model=data.champion,
        retrain=retrain_settings(data, tmp_path, enabled=True, schedule="0 3 * * 0"),
        storage={"thumbnail_dir": str(tmp_path / "thumbnails")},
        gate={"enabled": False},  # the synthetic images are not radiographs: the typicality gate would refuse them
    )
    harness.config["model"]["reload_interval"] = 0.1
    settings = Settings.from_values(harness.config)
    harness.worker.models.settings = settings.model
    config = write_config(tmp_path / "cxr.toml", harness.config)

    truth = _send_classes(harness, PER_CLASS, seed=2000)
    first_champion = registry.champion(harness.sessions)
    assert first_champion is not None and first_champion.version == "tiny-champion-1"
    assert {row["model_version"] for row in harness.rows()} == {"tiny-champion-1"}
    _feedback(harness, truth)

    # The scheduled run: the scheduler leads (its lease), the cron job is made due now.
    scheduler = RetrainScheduler(settings, harness.sessions)
    scheduler.start()
    try:
        wait_until(lambda: scheduler.leading, 60, "the scheduler to lead")
        assert scheduler.next_run_time() is not None and scheduler.next_run_time().strftime("%A") == "Sunday"
        assert scheduler.fire_now()
        wait_until(lambda: [r for r in runs(harness.engine) if r.state != db.RETRAIN_RUNNING], 240, "the run")
    finally:
        scheduler.stop()
    (run,) = runs(harness.engine)
    assert run.trigger == "schedule" and run.state == db.RETRAIN_PROMOTED, run.reason
    assert run.new_images == 3 * PER_CLASS and run.new_studies == 3 * PER_CLASS and run.feedback_after_id == 0
    assert run.challenger_metrics["macro_auc"] >= run.champion_metrics["macro_auc"] + RETRAIN["margin"]
    assert run.reason.startswith("macro AUC")
    champion = registry.champion(harness.sessions)
    assert champion is not None and champion.id == run.candidate_id and champion.parent_id == first_champion.id
    assert champion.version == f"tiny-champion-1-r{run.id}"
    assert champion.training_data["confirmed_images"] == 3 * PER_CLASS
    assert champion.training_data["replay_images"] == 3 * PER_CLASS
    assert len(champion.training_data["feedback_ids"]) == 3 * PER_CLASS
    assert champion.metrics["macro_auc"] == run.challenger_metrics["macro_auc"]
    assert Path(champion.path).parent == settings.model.models_dir.resolve()
    from cxr_triage.ml.checkpoint import load_classifier

    card = load_classifier(champion.path).card
    assert card.provenance["parent"]["sha256"] == first_champion.sha256
    assert card.provenance["calibration"]["parent_temperature"] == 1.5
    assert card.temperature == pytest.approx(card.provenance["calibration"]["temperature"])
    old = registry.find(harness.sessions, first_champion.sha256)
    assert old is not None and old.state == registry.RETIRED

    # The next image is classified by the new champion (the worker swaps between batches).
    time.sleep(0.2)  # past [model] reload_interval
    new_dataset_image = new_dataset(synthetic_image(0, seed=99))
    assert harness.send([new_dataset_image]) == [0] and harness.work() == 1
    assert _latest_version(harness) == champion.version

    # A challenger taught wrong labels (without replay, which would hold it to the base data) is worse on the fixed
    # set: rejected, the champion stays.
    truth = _send_classes(harness, PER_CLASS, seed=3000)
    _feedback(harness, truth, relabel={"covid": "normal", "normal": "pneumonia", "pneumonia": "covid"})
    no_replay = {**harness.config["retrain"], "replay_ratio": 0.0, "epochs": 0, "head_learning_rate": 3e-2}
    wrong = write_config(tmp_path / "no-replay.toml", {**harness.config, "retrain": no_replay})
    assert main(["retrain", "--now", "--config", str(wrong)]) == 0
    assert "rejected" in capsys.readouterr().out
    second = runs(harness.engine)[-1]
    assert second.trigger == "manual" and second.state == db.RETRAIN_REJECTED, second.reason
    assert second.feedback_after_id == run.feedback_to_id and second.new_images == 3 * PER_CLASS
    assert second.challenger_metrics["macro_auc"] < second.champion_metrics["macro_auc"]
    assert "less than the margin" in second.reason and "sensitivity fell" in second.reason
    assert registry.champion(harness.sessions).id == champion.id
    rejected = next(v for v in registry.list_versions(harness.sessions) if v.id == second.candidate_id)
    assert rejected.state == registry.RETIRED and "retraining run" in (rejected.state_reason or "")

    # Nothing new since the rejected run: skipped, with the reason; status and the run list show it.
    assert main(["retrain", "--now", "--config", str(config)]) == 0
    third = runs(harness.engine)[-1]
    assert third.state == db.RETRAIN_SKIPPED and third.reason.startswith("0 new labelled image(s)")
    capsys.readouterr()
    main(["status", "--json", "--config", str(config)])
    status = json.loads(capsys.readouterr().out)
    assert status["retraining"]["last_run"]["id"] == third.id and status["retraining"]["enabled"]
    assert main(["retrain", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert f"run {run.id} (schedule" in listing and "promoted" in listing and "rejected" in listing


def test_a_run_killed_mid_training_leaves_the_champion_and_the_next_run_records_it(data: Data, tmp_path: Path) -> None:
    killed = retrain_settings(data, tmp_path, head_epochs=0, epochs=500, replay_ratio=0.0)
    values = config_values(tmp_path, data.champion, retrain=killed)
    config = write_config(tmp_path / "cxr.toml", values)
    settings = Settings.from_values(values)
    engine = db.make_engine(settings.database.url)
    db.upgrade(engine)
    sessions = db.session_factory(engine)
    champion_id = register_champion(sessions, data.champion)
    seed_feedback(sessions, data.thumbnails)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "cxr_triage", "retrain", "--now", "--config", str(config)]
    job = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(
            lambda: [r for r in runs(sessions) if (r.step or "").startswith("training: retrain-all epoch")],
            240,
            "an epoch of training",
        )
        (run,) = runs(sessions)
        trainer = int(run.details["training_pid"])
        job.send_signal(signal.SIGKILL)
        job.wait(30)
    finally:
        if job.poll() is None:
            job.kill()
        job.stderr.close()  # type: ignore[union-attr]
    wait_until(lambda: not _alive(trainer), 60, "the orphaned training process to stop by itself")
    assert registry.champion(sessions).id == champion_id
    assert [v.id for v in registry.list_versions(sessions)] == [champion_id], "no candidate was registered"
    assert not (Path(run.details["folder"]) / "out" / "retrain.json").exists()
    assert runs(sessions)[0].state == db.RETRAIN_RUNNING

    # The next run, once the dead one's lease has expired, records it as failed.
    wait_until(lambda: not _held(sessions, retraining.RUN_LEASE), 60, "the dead run's lease to expire", interval=0.5)
    skip = write_config(tmp_path / "skip.toml", {**values, "retrain": {**values["retrain"], "min_new_labels": 10**6}})
    assert main(["retrain", "--now", "--config", str(skip)]) == 0
    dead, skipped = runs(sessions)
    assert dead.state == db.RETRAIN_FAILED and "stopped without finishing" in dead.reason
    assert "training: retrain-all epoch" in dead.reason, "the reason names the step it died at"
    assert skipped.state == db.RETRAIN_SKIPPED
    assert registry.champion(sessions).id == champion_id
    engine.dispose()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped by nobody but init) counts as gone
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- two schedulers on one PostgreSQL ----------------------------------------------------------------------------


def _scheduler_process(values: dict[str, Any], barrier: Any, fire: Any, stop_file: Path, results: Any) -> None:
    settings = Settings.from_values(values)
    engine = db.make_engine(settings.database.url)
    scheduler = RetrainScheduler(settings, db.session_factory(engine))
    try:
        barrier.wait(timeout=120)
        scheduler.start()
        fire.wait(timeout=120)
        results.put(("fired", os.getpid(), scheduler.fire_now()))
        # a file, not a multiprocessing Event: setting an Event that a SIGKILLed process waited on hangs the setter
        deadline = time.monotonic() + 300
        while not stop_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        scheduler.stop()
        engine.dispose()


@pytest.mark.postgres
def test_two_schedulers_on_one_postgresql_run_the_job_once_and_the_survivor_takes_over(
    tmp_path: Path, postgres_url: str
) -> None:
    values = config_values(
        tmp_path,
        None,
        database={"url": postgres_url},
        retrain={**RETRAIN, "enabled": True, "base_pack": "/nonexistent.pack", "schedule": "0 3 * * 0"},
    )
    engine = db.make_engine(postgres_url)
    db.upgrade(engine)
    sessions = db.session_factory(engine)
    ctx = mp.get_context("fork")
    barrier, fire, results, stop_file = ctx.Barrier(2), ctx.Event(), ctx.Queue(), tmp_path / "stop"
    args = (values, barrier, fire, stop_file, results)
    procs = [ctx.Process(target=_scheduler_process, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        leader = wait_until(lambda: _lease_holder(sessions), 60, "a scheduler to lead")
        time.sleep(1.5)  # both have tried for the lease at least once (every lock_seconds / 3)
        assert _lease_holder(sessions) == leader
        fire.set()
        fired = [results.get(timeout=60) for _ in procs]
        assert sorted(f[2] for f in fired) == [False, True], fired
        wait_until(lambda: [r for r in runs(sessions) if r.state != db.RETRAIN_RUNNING], 60, "the run")
        time.sleep(1.0)
        (run,) = runs(sessions)
        assert run.state == db.RETRAIN_SKIPPED and run.trigger == "schedule"
        leading_pid = next(pid for kind, pid, did in fired if did)
        assert run.holder.split(":")[1] == str(leading_pid) and leader.split(":")[1] == str(leading_pid)

        # The leader dies without giving its lease back: the other one leads once the lease expired.
        os.kill(leading_pid, signal.SIGKILL)
        survivor = wait_until(
            lambda: (h := _lease_holder(sessions)) and h != leader and h, 60, "the survivor to take over"
        )
        assert survivor.split(":")[1] == str(next(p.pid for p in procs if p.pid != leading_pid))
    finally:
        stop_file.touch()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        engine.dispose()
    after = db.make_engine(postgres_url)
    try:
        assert len(runs(db.session_factory(after))) == 1
    finally:
        after.dispose()  # the database is dropped after the test: no connection left behind


def _held(sessions: Any, name: str) -> bool:
    with sessions() as session:
        state = schedlock.read(session, name)
    return state is not None and state.held(db.utcnow())


def _lease_holder(sessions: Any) -> str | None:
    with sessions() as session:
        state = schedlock.read(session, SCHEDULER_LEASE)
    return state.holder if state is not None and state.held(db.utcnow()) else None
