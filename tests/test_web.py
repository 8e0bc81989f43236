"""The worklist: priorities raised by the rules, the JSON API and pages, feedback, and who may write.

The application runs in-process (FastAPI's TestClient) over a harness whose listener received real DICOM; the
browser test (``test_web_browser.py``) drives the real processes with Chromium.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import chest_dataset
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from cxr_triage.cli import main
from cxr_triage.core import db
from cxr_triage.core.settings import TriageSettings
from cxr_triage.triage import flags
from cxr_triage.web import auth
from cxr_triage.web.app import create_app

PASSWORD = "correct horse battery"


def client(harness: Any, **web: Any) -> TestClient:
    """A client that reads without a login (``anonymous_read``, off by default: test_web_reading.py tests that)."""
    web = {"anonymous_read": True, **web}
    settings = harness.settings.with_values(web=web)
    return TestClient(create_app(settings, harness.engine), base_url="http://worklist.test")


def add_user(harness: Any, name: str = "rad1") -> None:
    with harness.sessions() as session, session.begin():
        auth.add_user(session, name, PASSWORD)


def logged_in(harness: Any, name: str = "rad1") -> tuple[TestClient, str]:
    """A client with a session, and its CSRF token (read from the study page's form)."""
    add_user(harness, name)
    web = client(harness)
    response = web.post("/login", data={"username": name, "password": PASSWORD, "next": "/"}, follow_redirects=False)
    assert response.status_code == 303 and auth.COOKIE in response.cookies
    with harness.sessions() as session:
        token = session.scalars(select(db.WebSession.csrf_token).where(db.WebSession.username == name)).one()
    return web, token


def test_the_rules_give_each_study_its_priority(make_harness) -> None:
    harness = make_harness(triage={"covid_threshold": 1.0, "pneumonia_threshold": 1.0, "review_below": 0.0})
    routine, lateral = chest_dataset(seed=1), chest_dataset(seed=2, ViewPosition="LL")
    harness.send([routine, lateral])
    harness.work()
    rows = {r["study_instance_uid"]: r for r in client(harness).get("/api/worklist").json()}
    assert (rows[routine.StudyInstanceUID]["priority"], rows[routine.StudyInstanceUID]["priority_rule"]) == (
        "routine",
        "routine",
    )
    refused = rows[lateral.StudyInstanceUID]
    assert (refused["priority"], refused["priority_rule"], refused["status"]) == ("review", "refused", "refused")
    assert "ViewPosition" in refused["priority_reason"] and "ViewPosition" in refused["reasons"][0]
    assert rows[routine.StudyInstanceUID]["priority_thresholds"] == {
        "covid_threshold": 1.0,
        "pneumonia_threshold": 1.0,
        "review_below": 0.0,
    }
    assert rows[routine.StudyInstanceUID]["priority_model_version"] == "tiny-test"


@pytest.mark.parametrize(
    ("triage", "expected"),
    [
        ({"covid_threshold": 0.0}, ("urgent", "covid")),
        ({"covid_threshold": 1.0, "pneumonia_threshold": 0.0}, ("priority", "pneumonia")),
        ({"covid_threshold": 1.0, "pneumonia_threshold": 1.0, "review_below": 1.0}, ("review", "low-confidence")),
    ],
)
def test_each_rule_raises_its_priority(make_harness, triage: dict[str, float], expected: tuple[str, str]) -> None:
    harness = make_harness(triage=triage)
    harness.send([chest_dataset(seed=3)])
    harness.work()
    (row,) = client(harness).get("/api/worklist").json()
    assert (row["priority"], row["priority_rule"]) == expected


def test_a_study_is_provisional_until_quiet_and_reopens_with_a_new_instance(make_harness) -> None:
    harness = make_harness(worker={"study_quiet_seconds": 3600}, triage={"covid_threshold": 1.0, "review_below": 0.0})
    first = chest_dataset(seed=4)
    harness.send([first])
    harness.work()
    (row,) = client(harness).get("/api/worklist").json()
    assert row["priority"] is not None and row["priority_final"] is False, "raised at once, final only when quiet"
    from cxr_triage.triage import studies

    later = db.utcnow() + dt.timedelta(hours=2)
    assert studies.aggregate_studies(harness.sessions, 3600, now=later, triage=harness.settings.triage)
    (row,) = client(harness).get("/api/worklist").json()
    assert row["priority_final"] is True
    harness.send([chest_dataset(seed=5, StudyInstanceUID=first.StudyInstanceUID, ViewPosition="LL")])
    (row,) = client(harness).get("/api/worklist").json()
    assert row["priority_final"] is False and row["status"] == "queued", "a new instance reopens the study"
    harness.work()
    (row,) = client(harness).get("/api/worklist").json()
    assert row["instances"] == 2 and row["priority"] == "review", "the refused image now rules the study"


def test_the_worklist_is_sorted_by_priority_then_arrival_and_filters(make_harness) -> None:
    harness = make_harness(triage={"covid_threshold": 1.0, "pneumonia_threshold": 1.0, "review_below": 0.0})
    early, lateral, late = chest_dataset(seed=6), chest_dataset(seed=7, ViewPosition="LL"), chest_dataset(seed=8)
    for ds in (early, lateral, late):
        harness.send([ds])
    harness.work()
    web = client(harness)
    order = [r["study_instance_uid"] for r in web.get("/api/worklist").json()]
    assert order == [lateral.StudyInstanceUID, early.StudyInstanceUID, late.StudyInstanceUID]
    assert [r["priority"] for r in web.get("/api/worklist?priority=review").json()] == ["review"]
    today = dt.datetime.now(dt.UTC).date()
    assert len(web.get(f"/api/worklist?since={today}&until={today}").json()) == 3
    assert web.get(f"/api/worklist?since={today + dt.timedelta(days=1)}").json() == []
    assert web.get("/api/worklist?since=yesterday").status_code == 422
    assert web.get("/api/worklist?priority=whatever").status_code == 422


def test_a_study_page_shows_instances_reasons_srs_and_the_model_input(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=9, AccessionNumber="ACC-9", PatientName="Secret^Patient", PatientID="PID-9")
    harness.send([ds])
    harness.work()
    web = client(harness)
    study = web.get(f"/api/studies/{ds.StudyInstanceUID}").json()
    (instance,) = study["instance_list"]
    assert instance["status"] == "done" and instance["sr_sop_instance_uids"] and instance["thumbnail"]
    assert study["patient"] == {"AccessionNumber": "ACC-9"}, "only the fields the configuration allows"
    picture = web.get(f"/thumbnails/{instance['id']}.png")
    assert picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size == (224, 224)
    page = web.get(f"/studies/{ds.StudyInstanceUID}").text
    assert instance["sr_sop_instance_uids"][0] in page and "ACC-9" in page
    everything = page + web.get("/").text + json.dumps(web.get("/api/worklist").json()) + json.dumps(study)
    assert "Secret" not in everything and "PID-9" not in everything
    shown = client(harness, patient_fields=["AccessionNumber", "PatientID"])
    assert shown.get(f"/api/studies/{ds.StudyInstanceUID}").json()["patient"]["PatientID"] == "PID-9"
    assert web.get("/api/studies/1.2.3.4").status_code == 404
    assert "/api/worklist" in web.get("/openapi.json").json()["paths"]


def test_no_thumbnail_for_pixels_that_carry_burned_in_annotation(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=10, BurnedInAnnotation="YES")
    harness.send([ds])
    harness.work()
    (instance,) = client(harness).get(f"/api/studies/{ds.StudyInstanceUID}").json()["instance_list"]
    assert instance["status"] == "done" and instance["thumbnail"] is False


def test_feedback_needs_a_login_and_its_csrf_token_and_is_audited(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=11)
    harness.send([ds])
    harness.work()
    uid = ds.StudyInstanceUID
    anonymous = client(harness)
    assert anonymous.post(f"/api/studies/{uid}/feedback", json={"label": "normal"}).status_code == 401
    form = anonymous.post(f"/studies/{uid}/feedback", data={"label": "normal"}, follow_redirects=False)
    assert form.status_code == 303 and form.headers["location"].startswith("/login")
    web, csrf = logged_in(harness)
    assert web.post(f"/api/studies/{uid}/feedback", json={"label": "normal"}).status_code == 403, "no token"
    wrong = web.post(f"/api/studies/{uid}/feedback", json={"label": "normal"}, headers={"X-CSRF-Token": "x" * 43})
    assert wrong.status_code == 403
    cross_site = web.post(
        f"/studies/{uid}/feedback",
        data={"label": "normal", "csrf": csrf},
        headers={"Origin": "http://evil.example"},
        follow_redirects=False,
    )
    assert cross_site.status_code == 403
    before = client(harness).get(f"/api/studies/{uid}").json()["label"]
    done = web.post(f"/studies/{uid}/feedback", data={"label": "pneumonia", "csrf": csrf, "comment": "RLL"})
    assert done.status_code == 200 and "pneumonia" in done.text
    (feedback,) = client(harness).get("/api/feedback").json()
    assert (feedback["username"], feedback["label_before"], feedback["label_after"]) == ("rad1", before, "pneumonia")
    assert feedback["model_version"] == "tiny-test" and feedback["comment"] == "RLL"
    api = web.post(f"/api/studies/{uid}/feedback", json={"label": "covid"}, headers={"X-CSRF-Token": csrf})
    assert api.status_code == 200 and api.json()["label_after"] == "covid"
    assert (
        web.post(f"/api/studies/{uid}/feedback", json={"label": "flu"}, headers={"X-CSRF-Token": csrf}).status_code
        == 422
    )
    with harness.sessions() as session:
        actions = session.scalars(select(db.AuditEntry.action).order_by(db.AuditEntry.id)).all()
    # the worker's first model load promotes the configured model to champion, which is audited too
    assert actions == ["model-promoted", "login", "feedback", "feedback"]


def test_feedback_exports_a_manifest_the_training_module_reads(make_harness, tmp_path: Path) -> None:
    from training.data import read_manifest

    harness = make_harness()
    ds = chest_dataset(seed=12)
    harness.send([ds])
    harness.work()
    web, csrf = logged_in(harness)
    web.post(f"/api/studies/{ds.StudyInstanceUID}/feedback", json={"label": "covid"}, headers={"X-CSRF-Token": csrf})
    csv_text = client(harness).get("/api/feedback.csv").text
    path = tmp_path / "feedback.csv"
    path.write_text(csv_text)
    manifest = read_manifest(path, root="/")
    (record,) = manifest.records
    assert record.label == 0 and record.source == "feedback" and record.path.suffix == ".png"


def test_login_failures_are_refused_and_audited_and_logout_needs_the_token(make_harness) -> None:
    harness = make_harness()
    add_user(harness)
    web = client(harness)
    failed = web.post("/login", data={"username": "rad1", "password": "wrong password"}, follow_redirects=False)
    assert failed.status_code == 303 and "failed=1" in failed.headers["location"]
    assert auth.COOKIE not in failed.cookies
    unknown = web.post("/login", data={"username": "nobody", "password": PASSWORD}, follow_redirects=False)
    assert "failed=1" in unknown.headers["location"]
    assert web.post("/login", data={"username": "rad1", "password": PASSWORD, "next": "//evil.example"},
                    follow_redirects=False).headers["location"] == "/"  # fmt: skip
    assert web.post("/logout", data={"csrf": "nope"}).status_code == 403
    with harness.sessions() as session:
        csrf = session.scalars(select(db.WebSession.csrf_token)).one()
    assert web.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    with harness.sessions() as session:
        assert session.scalars(select(db.WebSession)).all() == []
        actions = session.scalars(select(db.AuditEntry.action).order_by(db.AuditEntry.id)).all()
    assert actions == ["login-failed", "login-failed", "login", "logout"]


def test_only_the_allowed_networks_may_read() -> None:
    assert auth.address_allowed("10.1.2.3", ("10.0.0.0/8",))
    assert not auth.address_allowed("192.168.1.5", ("10.0.0.0/8", "127.0.0.1/32"))
    assert auth.address_allowed("127.0.0.1", ("10.0.0.0/8", "127.0.0.1/32"))
    assert auth.address_allowed("anything", ()), "no networks configured: any client that can connect"
    assert not auth.address_allowed(None, ("10.0.0.0/8",)) and not auth.address_allowed("testclient", ("::/0",))


def test_a_client_outside_the_allowed_networks_is_refused(make_harness) -> None:
    harness = make_harness()
    assert client(harness, allowed_networks=["10.0.0.0/8"]).get("/api/worklist").status_code == 403
    assert client(harness, allowed_networks=["10.0.0.0/8"]).get("/").status_code == 403


def test_users_command_adds_lists_and_removes_with_hashed_passwords(harness, capsys, monkeypatch) -> None:
    from conftest import write_config

    config = write_config(harness.tmp / "cxr.toml", harness.config)
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["users", "add", "rad2", "--password-stdin", "--config", str(config)]) == 2
    assert "at least 10 characters" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["users", "add", "rad2", "--password-stdin", "--config", str(config)]) == 0
    assert main(["users", "list", "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("rad2\t")
    with harness.sessions() as session:
        stored = session.scalars(select(db.User.password_hash)).one()
        assert stored.startswith("$argon2") and PASSWORD not in stored
        assert auth.verify_password(session, "rad2", PASSWORD) and not auth.verify_password(session, "rad2", "x" * 12)
    assert main(["users", "remove", "rad2", "--config", str(config)]) == 0
    assert main(["users", "remove", "rad2", "--config", str(config)]) == 2


def test_the_flag_rules_in_order() -> None:
    triage = TriageSettings(covid_threshold=0.5, pneumonia_threshold=0.5, review_below=0.6)
    assert flags.instance_flag({"covid": 0.5, "normal": 0.0, "pneumonia": 0.5}, triage, "m").priority == "urgent"
    assert flags.instance_flag({"covid": 0.4, "normal": 0.0, "pneumonia": 0.6}, triage, "m").rule == "pneumonia"
    assert flags.instance_flag({"covid": 0.3, "normal": 0.4, "pneumonia": 0.3}, triage, "m").rule == "low-confidence"
    assert flags.instance_flag({"covid": 0.1, "normal": 0.8, "pneumonia": 0.1}, triage, "m").rule == "routine"
    picked = flags.most_urgent([flags.refused_flag("lateral", triage), flags.instance_flag(
        {"covid": 0.9, "normal": 0.05, "pneumonia": 0.05}, triage, "m")])  # fmt: skip
    assert picked is not None and picked.priority == "urgent"
    assert flags.most_urgent([]) is None
    with pytest.raises(ValueError):
        flags.Flag("soon", "x", "y")
