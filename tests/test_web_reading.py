"""Reading the worklist: a login before any patient data (``[web] anonymous_read = false``, the default), an audit
row when a radiologist views a study, and what the rows show a radiologist.

The application runs in-process (FastAPI's TestClient) over a harness whose listener received real DICOM.
"""

from __future__ import annotations

from typing import Any

import pytest
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


def test_rows_say_why_in_words_with_the_probability_of_that_image_most_probable_first(make_harness) -> None:
    harness = make_harness(triage={"covid_threshold": 0.0})
    sent = [chest_dataset(seed=s) for s in (23, 24, 25)]
    for ds in sent:
        harness.send([ds])
    harness.work()
    add_user(harness)
    web = reader(harness)
    log_in(web)
    rows = web.get("/api/worklist").json()
    assert {r["priority"] for r in rows} == {"urgent"} and len(rows) == 3
    values = [r["key_probability"]["value"] for r in rows]
    assert values == sorted(values, reverse=True), "within a priority, the most probable first"
    for r in rows:
        assert r["key_probability"]["class"] == "covid"
        assert f"P(covid)={r['key_probability']['value']:.3f}" in r["priority_reason"], "the same image as the why"
        assert r["reason_text"].startswith("COVID-19 suspected: probability") and r["read"] is False
    page = web.get("/").text
    assert "COVID-19 suspected" in page and 'class="study-link"' in page and page.count("tiny-test") == 1
    assert ">" + rows[0]["study_instance_uid"] + "<" not in page, "the UID is the link's target, not its text"


def test_feedback_moves_a_study_out_of_the_unread_view_and_filters_by_status(make_harness) -> None:
    harness = make_harness()
    done, other = chest_dataset(seed=26), chest_dataset(seed=27, ViewPosition="LL")
    harness.send([done, other])
    harness.work()
    add_user(harness)
    web = reader(harness)
    log_in(web)
    csrf = web.get("/").text.split('name="csrf-token" content="')[1].split('"')[0]
    answer = web.post(f"/api/studies/{done.StudyInstanceUID}/feedback", json={"label": "normal"},
                      headers={"X-CSRF-Token": csrf})  # fmt: skip
    assert answer.status_code == 200
    unread = [r["study_instance_uid"] for r in web.get("/api/worklist?read=unread").json()]
    read = [r["study_instance_uid"] for r in web.get("/api/worklist?read=read").json()]
    assert (unread, read) == ([other.StudyInstanceUID], [done.StudyInstanceUID])
    assert done.StudyInstanceUID not in web.get("/").text, "the page shows the unread studies by default"
    assert done.StudyInstanceUID in web.get("/?read=all").text
    assert [r["status"] for r in web.get("/api/worklist?status=refused").json()] == ["refused"]
    assert web.get("/api/worklist?read=maybe").status_code == 422
    assert web.get("/api/worklist?status=lost").status_code == 422


def test_age_sex_and_description_when_patient_fields_allow_them(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=28, AccessionNumber="ACC-28", PatientAge="054Y", PatientSex="F",
                       StudyDescription="CHEST PA", PatientName="Secret^Patient")  # fmt: skip
    harness.send([ds])
    harness.work()
    add_user(harness)
    fields = ["AccessionNumber", "PatientAge", "PatientSex", "StudyDescription"]
    web = reader(harness, patient_fields=fields)
    log_in(web)
    page = web.get("/").text
    assert "054Y F" in page and ">CHEST PA</a>" in page and "ACC-28" in page and "Secret" not in page
    plain = reader(harness)
    log_in(plain)
    assert "054Y" not in plain.get("/").text and "CHEST PA" not in plain.get("/").text, "not allowed by default"


def test_viewer_url_links_every_row_and_the_study_page(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=29)
    harness.send([ds])
    harness.work()
    add_user(harness)
    web = reader(harness, viewer_url="https://pacs.example/ohif/viewer?StudyInstanceUIDs={StudyInstanceUID}")
    log_in(web)
    link = f"https://pacs.example/ohif/viewer?StudyInstanceUIDs={ds.StudyInstanceUID}"
    (row,) = web.get("/api/worklist").json()
    assert row["viewer_url"] == link
    assert f'class="viewer-link" href="{link}"' in web.get("/").text
    assert f'id="viewer-link" href="{link}"' in web.get(f"/studies/{ds.StudyInstanceUID}").text
    plain = reader(harness)
    log_in(plain)
    assert plain.get("/api/worklist").json()[0]["viewer_url"] is None and "viewer-link" not in plain.get("/").text
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        harness.settings.with_values(web={"viewer_url": "https://pacs.example/viewer"})
    with pytest.raises(ValueError, match="http"):
        harness.settings.with_values(web={"viewer_url": "javascript:alert({StudyInstanceUID})"})


def test_docs_serves_swagger_ui_from_the_application_under_its_csp(make_harness) -> None:
    harness = make_harness()
    web = reader(harness)
    page = web.get("/docs")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "cdn" not in page.text.lower() and "http" not in page.text.split("<body>")[1], "nothing from elsewhere"
    assert "<script>" not in page.text, "no inline script (the CSP forbids it)"
    for path, kind in (("/docs/assets/swagger-ui-bundle.js", "javascript"), ("/docs/assets/swagger-ui.css", "css"),
                       ("/docs/init.js", "javascript")):  # fmt: skip
        response = web.get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"] and response.content, path
    assert web.get("/docs/assets/index.html").status_code == 404 and web.get("/docs/assets/..%2Fx").status_code == 404
    assert "/api/worklist" in web.get("/openapi.json").json()["paths"]
