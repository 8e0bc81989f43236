"""The operations endpoints: ``/metrics`` parsed with prometheus_client's own parsers and compared with the rows of
the database, ``/healthz`` passing and failing check by check (database gone, hung or unreachable; no model loaded;
spool below its reserve; a stalled queue), and neither showing patient data."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import chest_dataset, config_values, free_port
from fastapi.testclient import TestClient
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text

from cxr_triage.core import db
from cxr_triage.core.settings import Settings
from cxr_triage.ml import registry
from cxr_triage.ops import health, metrics
from cxr_triage.queue import jobqueue
from cxr_triage.testing.peers import wait_until
from cxr_triage.web.app import create_app

PRIVATE = {"PatientName": "Secret^Patient", "PatientID": "PID-SECRET-7", "AccessionNumber": "ACC-SECRET-7"}
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def client(settings: Settings, engine: Any, **web: Any) -> TestClient:
    if web:
        settings = settings.with_values(web=web)
    return TestClient(create_app(settings, engine), base_url="http://ops.test")


def scrape(web: TestClient, accept: str | None = None) -> dict[str, Metric]:
    response = web.get("/metrics", headers={"accept": accept} if accept else {})
    assert response.status_code == 200, response.text
    parse = openmetrics_families if accept == OPENMETRICS else text_string_to_metric_families
    return {family.name: family for family in parse(response.text)}


def samples(families: dict[str, Metric], name: str, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """The values of a family's samples named ``name + suffix``, by their sorted labels."""
    return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples if s.name == f"{name}{suffix}"}


def value(families: dict[str, Metric], name: str, suffix: str = "", **labels: str) -> float:
    return samples(families, name, suffix)[tuple(sorted(labels.items()))]


def healthz(web: TestClient) -> tuple[int, dict[str, Any]]:
    response = web.get("/healthz")
    return response.status_code, response.json()


def enqueue(engine: Any, uid: str, received_at: dt.datetime | None = None) -> None:
    """A queued instance, as the listener enqueues one (no worker needs to read it here)."""
    item = jobqueue.ReceivedInstance(
        sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid=f"{uid}.1",
        series_instance_uid=None, transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="TESTSCU",
        sha256=uid.replace(".", "").ljust(64, "0"), size_bytes=1,
    )  # fmt: skip
    with db.session_factory(engine)() as session, session.begin():
        jobqueue.enqueue(session, item, Path(f"/nonexistent/{uid}.dcm"), now=received_at)


def test_metrics_equal_the_rows_of_the_database_and_show_no_patient_data(make_harness) -> None:
    # One pipeline in every state (classified, refused, failed, held, queued, dead forwards), then each family
    # against its rows: building that state costs more than the comparisons, so they share it.
    closed = free_port()
    harness = make_harness(
        forward={"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": closed}], "max_attempts": 1}
    )
    worked = [chest_dataset(seed=1, **PRIVATE), chest_dataset(seed=2, **PRIVATE)]
    lateral = chest_dataset(seed=3, ViewPosition="LL", **PRIVATE)
    waiting = [chest_dataset(seed=s, **PRIVATE) for s in (4, 5, 6)]
    assert harness.send([*worked, lateral]) == [0, 0, 0]
    assert harness.work() == 3
    assert harness.send(waiting) == [0, 0, 0]
    long_ago = db.utcnow() - dt.timedelta(hours=1)
    assert len(jobqueue.claim(harness.sessions, "gone", 1, 60, 1, now=long_ago)) == 1  # its worker died
    assert len(jobqueue.claim(harness.sessions, "busy", 1, 600, 1)) == 1  # fails the expired job, holds the next
    web = client(harness.settings, harness.engine)

    families = scrape(web)
    with db.read_session(harness.engine) as session:
        states = Counter(session.scalars(select(db.Instance.status)))
        predictions = session.scalars(select(db.PredictionRecord)).all()
        refusals = Counter(session.scalars(select(db.RefusalRecord.code)))
        queued_at = session.scalar(select(db.Instance.received_at).where(db.Instance.status == db.QUEUED))
    assert states == {"done": 2, "refused": 1, "failed": 1, "processing": 1, "queued": 1}
    assert value(families, "cxr_triage_database_up") == 1
    assert value(families, "cxr_triage_instances_received", "_total") == sum(states.values()) == 6
    assert value(families, "cxr_triage_instances_failed", "_total") == states["failed"] == 1
    assert samples(families, "cxr_triage_queue_jobs") == {(("state", "queued"),): 1, (("state", "processing"),): 1}
    assert value(families, "cxr_triage_queue_lease_expired_jobs") == 0
    assert 0 <= value(families, "cxr_triage_queue_oldest_age_seconds") <= (db.utcnow() - queued_at).total_seconds()
    assert samples(families, "cxr_triage_refusals", "_total") == {(("reason", "not_frontal"),): 1}
    assert refusals == {"not_frontal": 1}
    by_pair = Counter((p.label, p.model_version) for p in predictions)
    assert samples(families, "cxr_triage_classifications", "_total") == {
        (("label", label), ("model_version", version)): n for (label, version), n in by_pair.items()
    }
    assert {p.model_version for p in predictions} == {"tiny-test"} and len(predictions) == 2
    for name, milliseconds in (
        ("cxr_triage_inference_duration_seconds", [p.inference_ms for p in predictions]),
        ("cxr_triage_classification_duration_seconds", [p.total_ms for p in predictions]),
    ):
        buckets = samples(families, name, "_bucket")
        assert buckets.pop((("le", "+Inf"),)) == value(families, name, "_count") == len(milliseconds)
        assert value(families, name, "_sum") == pytest.approx(sum(milliseconds) / 1000.0)
        assert len(buckets) == len(metrics.LATENCY_BUCKETS)
        for ((_, bound),), n in buckets.items():
            assert n == sum(ms <= float(bound) * 1000.0 for ms in milliseconds), (name, bound)
    assert samples(families, "cxr_triage_forwards") == {
        (("state", "pending"),): 0, (("state", "sent"),): 0, (("state", "dead"),): 2
    }  # fmt: skip
    assert value(families, "cxr_triage_forwards_retrying") == 0
    for outbox in ("cxr_triage_hl7_messages", "cxr_triage_orthanc_metadata"):  # every output of the registry
        assert samples(families, outbox) == {} and value(families, f"{outbox}_retrying") == 0, outbox
    ((labels, one),) = samples(families, "cxr_triage_model_info").items()
    assert dict(labels)["version"] == "tiny-test" and dict(labels)["latest"] == "true" and one == 1
    assert value(families, "cxr_triage_spool_reserve_bytes") == 1024 * 1024  # [storage] min_free_mb = 1
    assert value(families, "cxr_triage_spool_free_bytes") > 0

    later = scrape(web, OPENMETRICS)
    assert value(later, "cxr_triage_instances_received", "_total") == 6
    assert value(later, "cxr_triage_inference_duration_seconds", "_count") == 2

    code, report = healthz(web)
    assert code == 200 and report["failing"] == [], report  # failures and dead forwards are metrics, not ill health
    everything = web.get("/metrics").text + web.get("/metrics", headers={"accept": OPENMETRICS}).text
    everything += json.dumps(report)
    secrets = [*PRIVATE.values(), "Secret"]
    for ds in (*worked, lateral, *waiting):
        secrets += [ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID]
    assert [s for s in secrets if s in everything] == []


def test_healthz_passes_then_fails_naming_each_check(make_harness) -> None:
    harness = make_harness()
    web = client(harness.settings, harness.engine)
    code, report = healthz(web)
    assert (code, report["failing"]) == (503, ["model"])
    assert report["checks"]["model"]["detail"].startswith("no worker has loaded the configured checkpoint")

    assert harness.work() == 0  # a worker starts: it loads and registers the model before it claims
    code, report = healthz(web)
    assert (code, report["status"], report["failing"]) == (200, "ok", [])
    assert set(report["checks"]) == {"database", "model", "spool", "queue"}
    assert all(check["ok"] for check in report["checks"].values())
    assert report["checks"]["model"]["detail"].startswith("tiny-test (sha256 ")
    assert report["checks"]["queue"]["detail"] == "nothing queued"

    enqueue(harness.engine, "1.2.826.0.1.3680043.10.1", received_at=db.utcnow() - dt.timedelta(hours=2))
    code, report = healthz(web)
    assert (code, report["failing"]) == (503, ["queue"])
    assert "has waited 72" in report["checks"]["queue"]["detail"], report  # 7200 s, give or take a few
    patient = client(harness.settings, harness.engine, max_queue_age_seconds=3 * 3600)
    assert healthz(patient)[0] == 200

    full = harness.settings.with_values(storage={"min_free_mb": 1 << 40}, web={"max_queue_age_seconds": 3 * 3600})
    code, report = healthz(client(full, harness.engine))
    assert (code, report["failing"]) == (503, ["spool"])
    assert "below the reserve" in report["checks"]["spool"]["detail"]

    without = make_harness(model=None)
    code, report = healthz(client(without.settings, without.engine))
    assert (code, report["failing"]) == (503, ["model"])
    detail = report["checks"]["model"]["detail"]
    assert detail == "no checkpoint on this host and no champion model registered by a worker"


def test_a_database_that_is_gone_fails_healthz_and_zeroes_database_up(harness) -> None:
    harness.work()
    web = client(harness.settings, harness.engine)
    assert healthz(web)[0] == 200
    database = Path(harness.settings.database.url.removeprefix("sqlite:///"))
    for path in database.parent.glob(database.name + "*"):  # the file, its -wal and -shm
        path.unlink()
    code, report = healthz(web)
    assert (code, report["failing"]) == (503, ["database"])
    assert report["checks"]["database"] == {"ok": False, "detail": "the SQLite database file does not exist"}
    assert report["checks"]["model"]["ok"] is None and report["checks"]["queue"]["ok"] is None
    assert report["checks"]["spool"]["ok"] is True
    families = scrape(web)
    assert value(families, "cxr_triage_database_up") == 0
    assert "cxr_triage_instances_received" not in families and "cxr_triage_spool_free_bytes" in families


def test_a_database_server_that_refuses_connections_fails_healthz(harness) -> None:
    engine = db.make_engine(f"postgresql+psycopg://cxr@127.0.0.1:{free_port()}/cxr")
    try:
        web = client(harness.settings, engine)
        code, report = healthz(web)
        assert (code, report["failing"]) == (503, ["database"])
        assert report["checks"]["database"]["detail"].startswith("OperationalError: "), report
        assert value(scrape(web), "cxr_triage_database_up") == 0
    finally:
        engine.dispose()


def test_a_hung_database_fails_the_probes_within_the_timeout(harness, monkeypatch) -> None:
    harness.work()
    monkeypatch.setattr(health, "DATABASE_TIMEOUT", 1.0)
    web = client(harness.settings, harness.engine)
    assert healthz(web)[0] == 200
    harness.engine.dispose()  # an exclusive SQLite lock needs every other connection closed
    lock = sqlite3.connect(harness.settings.database.url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("PRAGMA locking_mode = EXCLUSIVE")
        lock.execute("BEGIN EXCLUSIVE")  # readers now wait out their 30 s busy timeout
        code, report = healthz(web)
        assert (code, report["failing"]) == (503, ["database"])
        assert report["checks"]["database"]["detail"] == "no answer from the database within 1 s"
        assert value(scrape(web), "cxr_triage_database_up") == 0
    finally:
        lock.close()
    wait_until(lambda: healthz(web)[0] == 200, 60, "healthz to pass once the lock is gone")


def test_hl7_messages_are_counted_where_their_table_exists(harness, monkeypatch) -> None:
    monkeypatch.setitem(metrics.OUTBOX_TABLES, "hl7", "ops_test_hl7_messages")
    web = client(harness.settings, harness.engine)
    assert "cxr_triage_hl7_messages" not in scrape(web)
    with harness.engine.begin() as conn:
        conn.execute(text("CREATE TABLE ops_test_hl7_messages (id INTEGER PRIMARY KEY, state VARCHAR(16) NOT NULL)"))
        conn.execute(text("INSERT INTO ops_test_hl7_messages (state) VALUES ('sent'), ('sent'), ('failed')"))
    assert samples(scrape(web), "cxr_triage_hl7_messages") == {(("state", "failed"),): 1, (("state", "sent"),): 2}


def test_orthanc_metadata_updates_are_counted_by_state(harness) -> None:
    assert harness.send([chest_dataset(seed=7)]) == [0]
    assert harness.work() == 1
    now = db.utcnow()
    with harness.sessions() as session, session.begin():
        study_id = session.scalar(select(db.Study.id))
        for state, attempts in (("pending", 0), ("pending", 2), ("sent", 1), ("superseded", 0)):
            row = {"study_id": study_id, "destination": "PACS@pacs:4242", "values": {}, "created_at": now}
            session.add(db.OrthancMetadata(**row, state=state, attempts=attempts, updated_at=now))
    families = scrape(client(harness.settings, harness.engine))
    assert samples(families, "cxr_triage_orthanc_metadata") == {
        (("state", "pending"),): 2, (("state", "sent"),): 1, (("state", "superseded"),): 1
    }  # fmt: skip
    assert value(families, "cxr_triage_orthanc_metadata_retrying") == 1


def test_metrics_can_be_switched_off_and_allowed_networks_apply(harness) -> None:
    harness.work()
    off = client(harness.settings, harness.engine, metrics=False)
    assert off.get("/metrics").status_code == 404
    assert healthz(off)[0] == 200
    elsewhere = client(harness.settings, harness.engine, allowed_networks=["10.0.0.0/8"])
    assert elsewhere.get("/healthz").status_code == 403 and elsewhere.get("/metrics").status_code == 403


@pytest.mark.postgres
def test_postgresql_metrics_and_a_locked_table(
    tmp_path: Path, tiny_model: Path, postgres_url: str, monkeypatch
) -> None:
    from cxr_triage.ml.checkpoint import load_classifier

    monkeypatch.setattr(health, "DATABASE_TIMEOUT", 1.0)
    settings = Settings.from_values(config_values(tmp_path, tiny_model, database={"url": postgres_url}))
    engine = db.make_engine(postgres_url)
    try:
        db.upgrade(engine)
        registry.register_model(db.session_factory(engine), load_classifier(tiny_model))
        for n in (1, 2):
            enqueue(engine, f"1.2.826.0.1.3680043.10.{n}")
        web = client(settings, engine)
        families = scrape(web)
        assert value(families, "cxr_triage_instances_received", "_total") == 2
        assert value(families, "cxr_triage_queue_jobs", state="queued") == 2
        assert value(families, "cxr_triage_inference_duration_seconds", "_count") == 0
        assert healthz(web)[0] == 200
        with engine.connect() as conn, conn.begin():
            conn.execute(text("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE"))  # readers wait for it
            code, report = healthz(web)
            assert (code, report["failing"]) == (503, ["database"])
            assert report["checks"]["database"]["detail"] == "no answer from the database within 1 s"
        wait_until(lambda: healthz(web)[0] == 200, 60, "healthz to pass once the lock is gone")
    finally:
        engine.dispose()


def test_healthz_on_a_host_without_the_checkpoint_names_the_champion(harness) -> None:
    assert harness.send([chest_dataset(seed=4)]) == [0]
    assert harness.work() == 1
    elsewhere = harness.settings.with_values(model={"path": str(harness.tmp / "not-on-this-host.pt")})
    code, report = healthz(client(elsewhere, harness.engine))
    assert report["checks"]["model"]["ok"] is True, report
    assert "the workers run the champion tiny-test" in report["checks"]["model"]["detail"]
