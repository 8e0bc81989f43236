"""The model registry: the migration on SQLite and PostgreSQL, promotion, rollback and rejection with their errors,
concurrent promotions, the ``models`` command, workers following the champion, and a running ``serve`` switching
models between two images of one association (and of dcmtk's storescu) without losing any.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from conftest import AE_TITLE, CALLING_AE, chest_dataset, config_values, write_config
from pynetdicom import AE, build_context
from sqlalchemy import Engine, select, text

from cxr_triage.cli import main
from cxr_triage.core import db
from cxr_triage.ml import registry
from cxr_triage.ml.checkpoint import CheckpointError
from cxr_triage.testing import peers

RACERS = 4


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))  # a fresh database in the session's cluster


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random classifiers named a to f (each file has its own sha256)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {name: peers.make_tiny_checkpoint(folder / f"{name}.pt", f"tiny-{name}") for name in "abcdef"}


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[Any]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'cxr.sqlite'}")
    db.upgrade(engine)
    yield db.session_factory(engine)
    engine.dispose()


def _candidate(sessions: Any, path: Path, parent_id: int | None = None) -> int:
    return registry.register_candidate(
        sessions,
        path,
        parent_id=parent_id,
        training_data={"feedback_ids": [1, 2], "study_uids": ["1.2.3"], "base_data": "pack", "replay": 8},
        config={"epochs": 1},
        metrics={"accuracy": 0.9, "macro_auc": 0.95},
    )


def _states(sessions: Any) -> dict[int, str]:
    return {entry.id: entry.state for entry in registry.list_versions(sessions)}


# --- the migration -------------------------------------------------------------------------------------------


def test_migration_turns_the_active_model_into_the_champion_and_back(database_url: str) -> None:
    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine, "0006")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO model_versions (version, sha256, path, registered_at, active) VALUES "
                    "('old', :a, '/m/old.pt', :t, :no), ('shipped', :b, '/m/shipped.pt', :t, :yes)"
                ),
                {"a": "a" * 64, "b": "b" * 64, "t": db.utcnow().replace(tzinfo=None), "no": False, "yes": True},
            )
        db.upgrade(engine)
        command.check(db.alembic_config(engine))  # the models and the migrations agree on this backend too
        sessions = db.session_factory(engine)
        rows = {entry.version: entry for entry in registry.list_versions(sessions)}
        assert rows["shipped"].state == "champion" and rows["shipped"].promoted_at is not None
        assert rows["old"].state == "retired" and rows["old"].promoted_at is None
        assert registry.champion(sessions) == rows["shipped"]
        with engine.begin() as conn, pytest.raises(Exception, match="(?i)unique"):  # one champion at most
            conn.execute(text("UPDATE model_versions SET state = 'champion' WHERE version = 'old'"))
        cfg = db.alembic_config(engine)
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0006")
            conn.commit()
        with engine.connect() as conn:
            active = dict(conn.execute(text("SELECT version, active FROM model_versions")).all())
        assert {k: bool(v) for k, v in active.items()} == {"old": False, "shipped": True}
        db.upgrade(engine)
        assert db.schema_state(engine) == "current"
    finally:
        engine.dispose()


# --- state changes -------------------------------------------------------------------------------------------


def test_store_model_file_keeps_one_copy_named_by_its_sha256(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    from cxr_triage.files import file_sha256

    stored = registry.store_model_file(checkpoints["a"], tmp_path / "models")
    assert stored == tmp_path / "models" / f"{file_sha256(checkpoints['a'])}.pt"
    assert stored.read_bytes() == checkpoints["a"].read_bytes()
    assert registry.store_model_file(checkpoints["a"], tmp_path / "models") == stored
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [stored.name]  # no temporary left


def test_candidates_are_registered_once_with_their_lineage_and_bad_files_are_refused(
    sessions: Any, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    first = _candidate(sessions, checkpoints["a"])
    assert _candidate(sessions, checkpoints["a"]) == first  # idempotent by sha256
    child = _candidate(sessions, checkpoints["b"], parent_id=first)
    entry = registry.list_versions(sessions)[-1]
    assert (entry.id, entry.parent_id, entry.state, entry.version) == (child, first, "candidate", "tiny-b")
    assert entry.training_data == {"feedback_ids": [1, 2], "study_uids": ["1.2.3"], "base_data": "pack", "replay": 8}
    assert entry.config == {"epochs": 1} and entry.metrics == {"accuracy": 0.9, "macro_auc": 0.95}
    assert registry.champion(sessions) is None  # a candidate is never the champion by itself
    with pytest.raises(registry.RegistryError, match="no model version 99"):
        _candidate(sessions, checkpoints["c"], parent_id=99)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        _candidate(sessions, broken)
    assert len(registry.list_versions(sessions)) == 2


def test_promote_rollback_and_reject(sessions: Any, checkpoints: dict[str, Path]) -> None:
    a, b, c, d = (_candidate(sessions, checkpoints[n]) for n in "abcd")
    registry.promote(sessions, a, "first")
    registry.promote(sessions, b, "better on the evaluation set")
    registry.promote(sessions, c, "better still")
    assert _states(sessions) == {a: "retired", b: "retired", c: "champion", d: "candidate"}
    champion = registry.champion(sessions)
    assert champion is not None and champion.id == c and champion.previous_champion_id == b
    assert champion.state_reason == "better still" and champion.promoted_at is not None
    assert registry.rollback(sessions, "worse in practice") == b
    assert _states(sessions) == {a: "retired", b: "champion", c: "retired", d: "candidate"}
    assert registry.rollback(sessions, "again") == a  # rollbacks go back one champion at a time
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback(sessions, "once more")
    with pytest.raises(registry.RegistryError, match="already the champion"):
        registry.promote(sessions, a, "again")
    with pytest.raises(registry.RegistryError, match="no model version 42"):
        registry.promote(sessions, 42, "unknown")
    registry.reject(sessions, d, "lost to the champion on the evaluation set")
    rejected = {entry.id: entry for entry in registry.list_versions(sessions)}[d]
    assert (rejected.state, rejected.state_reason) == ("retired", "lost to the champion on the evaluation set")
    assert rejected.retired_at is not None
    with pytest.raises(registry.RegistryError, match="is retired, not a candidate"):
        registry.reject(sessions, d, "twice")
    with pytest.raises(registry.RegistryError, match="is champion, not a candidate"):
        registry.reject(sessions, a, "the champion")
    with sessions() as session:
        actions = session.execute(select(db.AuditEntry.action, db.AuditEntry.detail).order_by(db.AuditEntry.id))
        logged = [(action, detail.get("from"), detail.get("to")) for action, detail in actions]
    assert logged == [
        ("model-promoted", None, a),
        ("model-promoted", a, b),
        ("model-promoted", b, c),
        ("model-rollback", c, b),
        ("model-rollback", b, a),
        ("model-rejected", None, None),
    ]


def test_a_version_whose_file_is_gone_or_changed_is_not_promoted(
    sessions: Any, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    copies = {n: Path(shutil.copy(checkpoints[n], tmp_path / f"{n}.pt")) for n in "ab"}
    a, b = _candidate(sessions, copies["a"]), _candidate(sessions, copies["b"])
    registry.promote(sessions, a, "first")
    copies["b"].write_bytes(checkpoints["c"].read_bytes())
    with pytest.raises(registry.RegistryError, match="missing or no longer has that sha256"):
        registry.promote(sessions, b, "changed file")
    stored = registry.store_model_file(checkpoints["b"], tmp_path / "models")  # found by its sha256 in models_dir
    registry.promote(sessions, b, "from the registry folder", models_dir=stored.parent)
    copies["a"].unlink()
    with pytest.raises(registry.RegistryError, match="cannot roll back to version 1"):
        registry.rollback(sessions, "file gone")
    assert _states(sessions) == {a: "retired", b: "champion"}


def _race(url: str, version_id: int, barrier: Any, results: Any) -> None:
    engine = db.make_engine(url)
    try:
        barrier.wait(timeout=120)
        registry.promote(db.session_factory(engine), version_id, f"racer {version_id}")
        results.put(("ok", version_id))
    except Exception as exc:  # reported to the test, which fails on it
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        engine.dispose()


def test_concurrent_promotions_leave_exactly_one_champion(database_url: str, checkpoints: dict[str, Path]) -> None:
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    sessions = db.session_factory(engine)
    try:
        ids = [_candidate(sessions, checkpoints[n]) for n in "abcde"]
        registry.promote(sessions, ids[0], "first")
        ctx = mp.get_context("fork")
        barrier, results = ctx.Barrier(RACERS), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(database_url, i, barrier, results)) for i in ids[1:]]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert sorted(outcomes) == [("ok", i) for i in ids[1:]]
        states = _states(sessions)
        assert sorted(states.values()) == ["champion"] + ["retired"] * RACERS
        # The promotions ran one after another: from the champion, each one's predecessor leads back to the first.
        by_id = {entry.id: entry for entry in registry.list_versions(sessions)}
        chain, at = [], registry.champion(sessions)
        while at is not None:
            chain.append(at.id)
            at = by_id.get(at.previous_champion_id) if at.previous_champion_id is not None else None
        assert sorted(chain) == sorted(ids) and chain[-1] == ids[0]
    finally:
        engine.dispose()


# --- the command ---------------------------------------------------------------------------------------------


def test_models_command_lists_promotes_and_rolls_back(
    tmp_path: Path, checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    values = config_values(tmp_path, checkpoints["a"])
    config = str(write_config(tmp_path / "cxr.toml", values))
    engine = db.make_engine(values["database"]["url"])
    db.upgrade(engine)
    sessions = db.session_factory(engine)
    a, b = _candidate(sessions, checkpoints["a"]), _candidate(sessions, checkpoints["b"], parent_id=1)
    registry.promote(sessions, a, "first")
    engine.dispose()

    assert main(["models", "list", "--config", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["id", "version", "sha256", "state", "parent", "promoted_at (UTC)", "metrics"]
    first, second = (line.split("\t") for line in lines[1:])
    assert first[:5] == ["1", "tiny-a", registry.list_versions(sessions)[0].sha256[:12], "champion", "-"]
    assert second[:6] == ["2", "tiny-b", second[2], "candidate", "1", "-"]
    assert second[6] == "accuracy=0.900 macro_auc=0.950"

    assert main(["models", "promote", str(b), "--reason", "new weights", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "champion: version 2 (tiny-b" in out and "was version 1 (tiny-a" in out and "now retired" in out
    assert main(["models", "list", "--json", "--config", config]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["state"]) for r in rows] == [(1, "retired"), (2, "champion")]
    assert rows[1]["state_reason"] == "new weights" and rows[1]["previous_champion_id"] == 1

    assert main(["models", "promote", str(b), "--config", config]) == 2
    assert "already the champion" in capsys.readouterr().err
    assert main(["models", "promote", "7", "--config", config]) == 2
    assert "no model version 7" in capsys.readouterr().err
    assert main(["models", "promote", "--config", config]) == 2
    assert "promote needs a version id" in capsys.readouterr().err

    assert main(["models", "rollback", "--config", config]) == 0
    assert "champion: version 1 (tiny-a" in capsys.readouterr().out
    assert main(["models", "rollback", "--config", config]) == 2
    assert "no earlier champion" in capsys.readouterr().err
    assert _states(sessions) == {1: "champion", 2: "retired"}


# --- workers follow the champion -----------------------------------------------------------------------------


def _model_of_each(engine: Engine) -> dict[str, str]:
    """SOP Instance UID -> the sha256 of the model that classified it."""
    with db.read_session(engine) as session:
        rows = session.execute(
            select(db.Instance.sop_instance_uid, db.PredictionRecord.model_sha256).join(db.PredictionRecord)
        ).all()
    return {str(uid): str(sha) for uid, sha in rows}


def test_a_worker_follows_promotions_and_rollbacks_and_a_restart_keeps_them(
    make_harness: Any, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from cxr_triage.triage.worker import Worker

    configured = Path(shutil.copy(checkpoints["a"], tmp_path / "configured.pt"))
    harness = make_harness(model=configured)
    harness.worker.models.settings = dataclasses.replace(harness.settings.model, reload_interval=0.01)
    sessions = harness.sessions
    first = chest_dataset(seed=1)
    harness.send([first])
    assert harness.work() == 1
    a = registry.champion(sessions)
    assert a is not None and a.version == "tiny-a" and a.state_reason == "the first model registered (configured)"
    assert Path(a.path) == harness.settings.model.models_dir / f"{a.sha256}.pt"  # the registry keeps its own copy
    b = _candidate(sessions, checkpoints["b"])
    registry.promote(sessions, b, "test")
    second = chest_dataset(seed=2)
    harness.send([second])
    assert peers.wait_until(lambda: harness.work() or None, 60, "the worker to classify the second image")
    shas = _model_of_each(harness.engine)
    b_sha = registry.champion(sessions).sha256  # type: ignore[union-attr]
    assert shas[str(first.SOPInstanceUID)] == a.sha256 and shas[str(second.SOPInstanceUID)] == b_sha

    restarted = Worker(harness.settings, harness.engine)  # the configuration still names a: b stays the champion
    third = chest_dataset(seed=3)
    harness.send([third])
    assert restarted.run_until_idle() == 1
    assert _model_of_each(harness.engine)[str(third.SOPInstanceUID)] == b_sha

    configured.write_bytes(checkpoints["c"].read_bytes())  # an operator deploys c by configuration
    fourth = chest_dataset(seed=4)
    harness.send([fourth])
    assert peers.wait_until(lambda: harness.work() or None, 60, "the worker to classify the fourth image")
    c = registry.champion(sessions)
    assert c is not None and (c.version, c.state_reason, c.previous_champion_id) == ("tiny-c", "configured", b)
    assert _model_of_each(harness.engine)[str(fourth.SOPInstanceUID)] == c.sha256


def test_a_champion_that_cannot_be_loaded_leaves_the_running_model(
    make_harness: Any, checkpoints: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness = make_harness(model=checkpoints["a"])
    harness.worker.models.settings = dataclasses.replace(harness.settings.model, reload_interval=0.01)
    harness.send([chest_dataset(seed=1)])
    assert harness.work() == 1
    doomed = Path(shutil.copy(checkpoints["d"], tmp_path / "doomed.pt"))
    registry.promote(harness.sessions, _candidate(harness.sessions, doomed), "test")
    doomed.unlink()
    later = chest_dataset(seed=2)
    harness.send([later])
    with caplog.at_level("ERROR"):
        assert peers.wait_until(lambda: harness.work() or None, 60, "the worker to classify the second image")
    assert "no file with sha256" in caplog.text and "keeping model tiny-a" in caplog.text
    versions = {entry.version: entry.sha256 for entry in registry.list_versions(harness.sessions)}
    assert _model_of_each(harness.engine)[str(later.SOPInstanceUID)] == versions["tiny-a"]


# --- a running serve -----------------------------------------------------------------------------------------


def _serve_config(tmp_path: Path, model: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    values = config_values(
        tmp_path,
        model,
        listener={"network_timeout": 600, "dimse_timeout": 120},
        storage={"thumbnail_dir": str(tmp_path / "thumbnails")},
        worker={"processes": 1, "threads": 1, "study_quiet_seconds": 3600},
    )
    values["model"]["reload_interval"] = 0.5
    return write_config(tmp_path / "cxr.toml", values), values


def test_serve_switches_to_a_promoted_champion_and_back_without_dropping_anything(
    tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    # One scenario with its helpers: a (two images), promote b (two images), roll back to a (two images).
    config, values = _serve_config(tmp_path, checkpoints["a"])
    port = int(values["listener"]["port"])
    engine = db.make_engine(values["database"]["url"])
    sessions = db.session_factory(engine)
    images = tmp_path / "images"
    images.mkdir()
    sent: list[str] = []

    def classified_by(uid: str) -> str | None:
        return _model_of_each(engine).get(uid)

    def via_storescu(seed: int) -> str:
        ds = chest_dataset(seed=seed)
        path = images / f"{seed}.dcm"
        ds.save_as(path, enforce_file_format=True)
        peers.storescu(port, [path])
        sent.append(str(ds.SOPInstanceUID))
        return str(ds.SOPInstanceUID)

    def via_held(assoc: Any, seed: int) -> str:
        ds = chest_dataset(seed=seed)
        assert assoc.is_established, "the held association was dropped"
        assert int(assoc.send_c_store(ds).Status) == 0
        sent.append(str(ds.SOPInstanceUID))
        return str(ds.SOPInstanceUID)

    def model_for(uid: str) -> str:
        return peers.wait_until(lambda: classified_by(uid), 120, f"{uid} to be classified")

    def loaded(server: peers.Server, version_id: int, times: int) -> None:
        marker = f"registry version {version_id}, the champion) loaded"
        peers.wait_until(
            lambda: server.log.read_text(errors="replace").count(marker) >= times or None,
            120,
            f"the worker to load version {version_id}",
        )

    try:
        with peers.Server(config, port, ready_timeout=120) as server:
            ae = AE(ae_title=CALLING_AE)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
            ae.requested_contexts = [build_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.1"])]
            assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
            assert assoc.is_established
            try:
                a_sha = model_for(via_held(assoc, 1))
                a = registry.champion(sessions)
                assert a is not None and a.sha256 == a_sha and a.version == "tiny-a"
                assert model_for(via_storescu(2)) == a.sha256

                b = _candidate(sessions, registry.store_model_file(checkpoints["b"], tmp_path / "models"))
                done = peers.cli("models", "promote", str(b), "--reason", "test", config=config)
                assert f"champion: version {b} (tiny-b" in done.stdout
                b_sha = registry.champion(sessions).sha256  # type: ignore[union-attr]
                loaded(server, b, 1)
                assert model_for(via_storescu(3)) == b_sha  # dcmtk's next image: the new champion
                assert model_for(via_held(assoc, 4)) == b_sha  # and the association open since before

                done = peers.cli("models", "rollback", config=config)
                assert f"champion: version {a.id} (tiny-a" in done.stdout
                loaded(server, a.id, 2)
                assert model_for(via_storescu(5)) == a.sha256
                assert model_for(via_held(assoc, 6)) == a.sha256
                assert assoc.is_established
            finally:
                assoc.release()
            assert server.alive()
        with db.read_session(engine) as session:
            states = session.execute(select(db.Instance.sop_instance_uid, db.Instance.status)).all()
        assert sorted(states) == sorted((uid, db.DONE) for uid in sent)  # every image acknowledged was classified
        assert len(_model_of_each(engine)) == len(sent) == 6
    finally:
        engine.dispose()
