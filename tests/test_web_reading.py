"""Reading the worklist: a login before any patient data (``[web] anonymous_read = false``, the default), an audit
row when a radiologist views a study, and what the rows show a radiologist.

The application runs in-process (FastAPI's TestClient) over a harness whose listener received real DICOM.
"""

from __future__ import annotations

from typing import Any

from conftest import chest_dataset
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_web import PASSWORD, add_user

from cxr_triage.core import db
from cxr_triage.web.app import create_app


def reader(harness: Any, **web: Any) -> TestClient:
    """A client with the configuration's defaults (and ``web``'s changes), not logged in."""
    settings = harness.settings.with_values(web=web) if web else harness.settings
    return TestClient(create_app(settings, harness.engine), base_url="http://worklist.test")


def log_in(web: TestClient, name: str = "rad1") -> None:
    response = web.post("/login", data={"username": name, "password": PASSWORD, "next": "/"}, follow_redirects=False)
    assert response.status_code == 303


def test_nothing_with_patient_data_is_served_without_a_login(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=21, AccessionNumber="ACC-21")
    harness.send([ds])
    harness.work()
    uid = ds.StudyInstanceUID
    web = reader(harness)
    for path in ("/api/worklist", f"/api/studies/{uid}", "/api/feedback", "/api/feedback.csv", "/thumbnails/1.png"):
        response = web.get(path)
        assert response.status_code == 401 and "ACC-21" not in response.text, path
    for path in ("/", f"/studies/{uid}", "/?priority=urgent"):
        response = web.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login?next=%2F"), path
    assert "ACC-21" not in web.get("/").text, "the page it leads to is the login form"
    for path in ("/healthz", "/metrics", "/login", "/docs", "/openapi.json", "/static/worklist.js"):
        response = web.get(path)
        assert response.status_code in (200, 503) and "ACC-21" not in response.text and uid not in response.text, path
    add_user(harness)
    log_in(web)
    assert [r["patient"]["AccessionNumber"] for r in web.get("/api/worklist").json()] == ["ACC-21"]
    assert "ACC-21" in web.get("/").text and "ACC-21" in web.get(f"/studies/{uid}").text
    open_again = reader(harness, anonymous_read=True)
    assert open_again.get("/api/worklist").status_code == 200, "anonymous_read = true: reads without a login"


def test_a_login_returns_to_the_page_asked_for(make_harness) -> None:
    harness = make_harness()
    add_user(harness)
    web = reader(harness)
    target = web.get("/studies/1.2.3?x=1", follow_redirects=False).headers["location"]
    page = web.get(target)
    assert 'name="next" value="/studies/1.2.3?x=1"' in page.text
    back = web.post("/login", data={"username": "rad1", "password": PASSWORD, "next": "/studies/1.2.3?x=1"},
                    follow_redirects=False)  # fmt: skip
    assert back.headers["location"] == "/studies/1.2.3?x=1"


def test_viewing_a_study_is_audited_once_a_moment(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=22)
    harness.send([ds])
    harness.work()
    add_user(harness)
    web = reader(harness)
    log_in(web)
    uid = ds.StudyInstanceUID
    assert web.get(f"/studies/{uid}").status_code == 200
    assert web.get(f"/api/studies/{uid}").status_code == 200
    with harness.sessions() as session:
        rows = session.execute(
            select(db.AuditEntry.action, db.AuditEntry.username, db.AuditEntry.target).order_by(db.AuditEntry.id)
        ).all()
    assert [tuple(r) for r in rows if r[0] == "study-viewed"] == [("study-viewed", "rad1", uid)]
