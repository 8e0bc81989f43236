"""Model registration under concurrency: workers that start together register one row, on SQLite and PostgreSQL.

Each process stands in for a worker that has just loaded the same checkpoint; all of them register it at the same
moment (a barrier), as ``serve`` with several worker processes, or several hosts on one PostgreSQL, do.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import chest_dataset
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from cxr_triage.core import db
from cxr_triage.ml import registry

RACERS = 6


@dataclass(frozen=True)
class _Card:
    model_version: str = "race-1"
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Loaded:
    """What ``register_model`` reads of a ``LoadedModel`` (no torch needed in the racing processes)."""

    sha256: str
    card: _Card = field(default_factory=_Card)
    path: Path = Path("/models/race.pt")


def _race(url: str, sha256: str, barrier: Any, results: Any) -> None:
    engine = db.make_engine(url)
    sessions = db.session_factory(engine)
    try:
        barrier.wait(timeout=120)
        results.put(("ok", registry.register_model(sessions, _Loaded(sha256))))  # type: ignore[arg-type]
    except Exception as exc:  # reported to the test, which fails on it
        results.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        engine.dispose()


def _run_race(url: str, sha256: str) -> list[tuple[str, Any]]:
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(url, sha256, barrier, results)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return outcomes


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'race.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))  # a fresh database in the session's cluster


def test_workers_starting_together_register_the_model_once(database_url: str) -> None:
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    try:
        for round_, sha in enumerate(c * 64 for c in "abcd"):  # a check-then-insert lost about one race in three
            outcomes = _run_race(database_url, sha)
            assert [kind for kind, _ in outcomes] == ["ok"] * RACERS, outcomes
            assert len({row_id for _, row_id in outcomes}) == 1  # every racer got the one row's id
            with db.session_factory(engine)() as session:
                rows = session.scalars(select(db.ModelVersion).order_by(db.ModelVersion.id)).all()
            assert len(rows) == round_ + 1
            assert [r.active for r in rows] == [True] + [False] * round_  # the first model ever stays the active one
            assert [r.state for r in rows] == ["champion"] + ["candidate"] * round_
    finally:
        engine.dispose()


def test_a_worker_whose_registration_fails_classifies_nothing_until_it_succeeds(make_harness, monkeypatch) -> None:
    harness = make_harness()
    harness.send([chest_dataset()])
    real = registry.deploy_configured
    calls: list[int] = []

    def flaky(sessions: Any, loaded: Any, path: Any) -> tuple[int, bool]:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return real(sessions, loaded, path)

    monkeypatch.setattr(registry, "deploy_configured", flaky)
    assert harness.work() == 0
    assert harness.worker.predictor is None
    assert [r["status"] for r in harness.rows()] == ["queued"]
    assert harness.work() == 1
    assert [r["status"] for r in harness.rows()] == ["ok"]
    assert len(calls) == 2
