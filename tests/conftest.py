"""Shared fixtures: a tiny random checkpoint, free ports, PostgreSQL databases, configurations, and an in-process
listener + worker.

``harness`` (or ``make_harness(**overrides)``) starts the real pynetdicom listener on a free 127.0.0.1 port with
a migrated SQLite database in ``tmp_path``; tests send with a real AE (``send``) or dcmtk, then run the worker
in-process with ``harness.work()`` and read the outcome from the database (``harness.rows()``).

The suite runs under pytest-xdist (``python -m pytest -n auto``); tests/README.md has the rules a new test keeps to:
ports from ``free_port`` (or bound to 0), files under ``tmp_path`` only, PostgreSQL through ``postgres_url`` (a fresh
database in the session's cluster), ``xdist_group`` for modules with expensive module fixtures.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification
from sqlalchemy import Engine

from cxr_triage.testing.peers import PostgresCluster
from cxr_triage.testing.peers import free_port as free_port  # re-exported for the tests
from cxr_triage.testing.peers import write_config as write_config  # re-exported for the tests
from cxr_triage.testing.synthetic import chest_dataset as chest_dataset  # re-exported for the tests

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DICOM = SHARED / "data" / "dicom"
AE_TITLE = "CXR_TRIAGE"
CALLING_AE = "TESTSCU"
_DATABASE_NUMBERS = itertools.count(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding a test marked ``slow`` run first, each module's tests kept together and in order.

    pytest-xdist hands out work in collection order: a long test collected last would run alone at the end while the
    other workers sit idle. Whole modules move, so that a module fixture is still set up once."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group is kept


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier checkpoint with random weights (ModelSpec(width=4, dense_units=8)): fast, meaningless."""
    from cxr_triage.ml.checkpoint import ModelCard, save_classifier
    from cxr_triage.ml.model import CAEClassifier, ModelSpec

    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    model = CAEClassifier(ModelSpec(width=4, dense_units=8))
    save_classifier(path, model, ModelCard(spec=model.spec, model_version="tiny-test"))
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The session's throwaway PostgreSQL cluster (one per pytest process, so one per xdist worker), started by
    the first test that asks for it. Tests take a database of their own from it with ``postgres_url``; a test
    that stops, breaks or inspects the cluster itself starts its own ``PostgresCluster``."""
    with PostgresCluster(database="cxr") as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> Iterator[str]:
    """The URL of a fresh, empty database in the session's cluster, for this test alone (dropped after it)."""
    name = f"test_{next(_DATABASE_NUMBERS)}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


def config_values(tmp: Path, model: Path | None, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The default configuration pointed at ``tmp`` (spool, SRs, SQLite) and ``model``, with ``overrides``."""
    from cxr_triage.core.config import load_config, merge

    values = {k: dict(v) for k, v in load_config(None, environ={}).values.items()}
    base: dict[str, dict[str, Any]] = {
        "listener": {"ae_title": AE_TITLE, "host": "127.0.0.1", "port": free_port(), "acse_timeout": 10},
        "storage": {
            "spool_dir": str(tmp / "spool"),
            "sr_dir": str(tmp / "sr"),
            "thumbnail_dir": str(tmp / "thumbnails"),
            "min_free_mb": 1,
        },
        "database": {"url": f"sqlite:///{tmp / 'db' / 'cxr.sqlite'}"},
        "model": {"path": str(model) if model else str(tmp / "no-model.pt"), "device": "cpu", "batch_size": 8},
        "worker": {"processes": 0, "poll_interval": 0.1, "study_quiet_seconds": 0, "claim_batch": 8},
        # the shipped gate refuses the small synthetic phantoms most tests send; tests of the gate turn it on
        "gate": {"enabled": False},
    }
    for section, table in overrides.items():
        base.setdefault(section, {}).update(table)
    return merge(values, base, "tests")


# --- datasets ------------------------------------------------------------------------------------------------


def save_dataset(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# --- sending -------------------------------------------------------------------------------------------------


def _syntax_of(item: Dataset | Path) -> tuple[str, str]:
    ds = item if isinstance(item, Dataset) else dcmread(item, stop_before_pixels=True, force=True)
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def send(
    port: int,
    items: Sequence[Dataset | Path],
    calling_ae: str = CALLING_AE,
    called_ae: str = AE_TITLE,
    contexts: Sequence[tuple[str, str]] | None = None,
    raw: bool = False,
) -> list[int | None]:
    """C-STORE each item over one association (one presentation context per SOP class and transfer syntax of
    the items, so compressed data travels as it is); the status of each, None when no response came.

    ``raw``: files are sent as their bytes, never decoded by the sender (pynetdicom's chunked sending), so
    a test can send data that no parser accepts."""
    from pynetdicom import _config

    wanted = list(dict.fromkeys(contexts or [_syntax_of(item) for item in items]))
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in wanted]
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, f"association to port {port} not established"
    statuses: list[int | None] = []
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        for item in items:
            response = assoc.send_c_store(item if isinstance(item, Dataset) else str(item))
            statuses.append(int(response.Status) if "Status" in response else None)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return statuses


def echo(port: int, calling_ae: str = CALLING_AE, called_ae: str = AE_TITLE) -> int | None:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


# --- in-process harness --------------------------------------------------------------------------------------


@dataclass
class Harness:
    """A migrated database, the running listener and a worker (not running: call ``work``)."""

    config: dict[str, dict[str, Any]]
    settings: Any  # cxr_triage.core.settings.Settings of ``config``
    engine: Engine
    listener: Any
    worker: Any
    tmp: Path
    _stopped: bool = field(default=False)

    @property
    def port(self) -> int:
        return int(self.listener.address[1])

    @property
    def sessions(self) -> Any:
        from cxr_triage.core import db

        return db.session_factory(self.engine)

    def send(self, items: Sequence[Dataset | Path], **kw: Any) -> list[int | None]:
        return send(self.port, items, **kw)

    def work(self) -> int:
        """Process the queue, then run the housekeeping once (forwarding, aggregation), as ``serve`` would."""
        from cxr_triage.ops.housekeeping import Housekeeping

        done = int(self.worker.run_until_idle())
        Housekeeping(self.settings, self.sessions).run_once()
        return done

    def rows(self, **filters: Any) -> list[dict[str, Any]]:
        from cxr_triage.commands.results import records
        from cxr_triage.core import db

        with db.read_session(self.engine) as session:
            return list(records(session, **filters))

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.listener.stop()
            self.engine.dispose()


def start_harness(tmp: Path, model: Path | None, **overrides: dict[str, Any]) -> Harness:
    from cxr_triage.core import db
    from cxr_triage.core.settings import Settings
    from cxr_triage.dicom import listener
    from cxr_triage.triage import worker

    config = config_values(tmp, model, **overrides)
    settings = Settings.from_values(config)
    engine = db.make_engine(settings.database.url)
    db.upgrade(engine)
    running = listener.Listener(settings.listener, listener.make_receiver(settings.storage, engine))
    running.start()
    runner = worker.Worker(settings, engine)
    return Harness(config=config, settings=settings, engine=engine, listener=running, worker=runner, tmp=tmp)


@pytest.fixture
def make_harness(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., Harness]]:
    started: list[Harness] = []

    def make(model: Path | None | str = "tiny", **overrides: dict[str, Any]) -> Harness:
        chosen = tiny_model if model == "tiny" else model
        sub = tmp_path / f"h{len(started)}"
        sub.mkdir()
        harness = start_harness(sub, chosen, **copy.deepcopy(overrides))  # type: ignore[arg-type]
        started.append(harness)
        return harness

    yield make
    for harness in started:
        harness.stop()


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


def dcmtk(name: str) -> str:
    """dcmtk's tool, not a same-named pynetdicom app that may come first on PATH."""
    from cxr_triage.testing.peers import dcmtk_tool

    return dcmtk_tool(name)


def write_sr(sr: Dataset, path: Path) -> Path:
    """Write a report the way the recorder does (atomically, as a Part 10 file)."""
    from cxr_triage.files import write_atomic
    from cxr_triage.outputs.sr import sr_to_bytes

    return write_atomic(path, sr_to_bytes(sr))
