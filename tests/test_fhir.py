"""FHIR R4 out: each finished study's DiagnosticReport, Observations and Device as a transaction of conditional
updates, received by the test FHIR server (``fhir_server``: every body validated with ``fhir.resources``, the
updates applied by identifier, references resolved); the codes and identifiers, a re-aggregated study updating the
same resources, retries and the dead letter with ``cxr-triage forward --retry``, answers that are failures (an error
status, a redirect, a body that is not a transaction-response, no server), a bearer token from the environment and
basic credentials from a file (never logged), HTTPS with the site's CA bundle, ``status`` and ``/metrics``, the
``[fhir]`` configuration's errors, and that the test server refuses what a FHIR server would."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import chest_dataset, config_values, free_port, write_config
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir_server import FHIRStore, apply_transaction, fhir_server, make_ca_and_server_certificate
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from cxr_triage import CLASS_NAMES
from cxr_triage.cli import main
from cxr_triage.core import db
from cxr_triage.core.config import ConfigError
from cxr_triage.core.fhirsettings import FHIRSettings
from cxr_triage.core.settings import Settings
from cxr_triage.ops import status
from cxr_triage.outputs import codes, fhir, fhirreport
from cxr_triage.outputs.delivery import retry_delay
from cxr_triage.outputs.hl7report import StudyReport
from cxr_triage.web.app import create_app

SYSTEM = "https://hospital.example/fhir/id/cxr-triage"
SNOMED = "http://snomed.info/sct"
HEADER = {"PatientID": "PAT-7", "IssuerOfPatientID": "HOSP-MRN", "PatientName": "Doe^Jane",
          "AccessionNumber": "ACC-77", "StudyDate": "20260304", "StudyTime": "101500"}  # fmt: skip


def _config(url: str, **destination: Any) -> dict[str, Any]:
    return {"destinations": [{"url": url, **destination}], "identifier_system": SYSTEM, "timeout": 10}


def _rows(harness: Any) -> list[db.FHIRReport]:
    with harness.sessions() as session:
        return list(session.scalars(select(db.FHIRReport).order_by(db.FHIRReport.id)).all())


def _report(**changes: Any) -> StudyReport:
    values: dict[str, Any] = {
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "patient_id": "PAT-1",
        "issuer_of_patient_id": "HOSP",
        "accession_number": "ACC-1",
        "observed_at": "20260304101500",
        "label": "pneumonia",
        "probabilities": {"covid": 0.05, "normal": 0.15, "pneumonia": 0.8},
        "priority": "priority",
        "priority_rule": "pneumonia",
        "priority_reason": "P(pneumonia) 0.80 >= 0.5",
        "model_version": "cae-lstm-test-1",
    }
    return StudyReport(**{**values, **changes})


def _by_identifier(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["value"]: r for r in resources for i in r.get("identifier", []) if i.get("system") == SYSTEM}


def test_the_bundle_is_valid_r4_with_the_srs_codes_identifiers_and_references_inside_it() -> None:
    settings = FHIRSettings(identifier_system=SYSTEM, patient_identifier_system="urn:oid:1.2.3.4")
    issued = dt.datetime(2026, 3, 4, 12, 0, tzinfo=dt.UTC)
    text = fhirreport.bundle_json(_report(), settings, issued)
    bundle = Bundle.model_validate_json(text)  # the library's own reading of what is sent
    assert bundle.type == "transaction"
    data = json.loads(text)
    entries = data["entry"]
    assert [e["resource"]["resourceType"] for e in entries] == ["Device", *["Observation"] * 4, "DiagnosticReport"]
    full_urls = {e["fullUrl"] for e in entries}
    assert len(full_urls) == len(entries) and all(u.startswith("urn:uuid:") for u in full_urls)
    for entry in entries:  # each a conditional update on the identifier the resource carries
        resource, request = entry["resource"], entry["request"]
        (ours,) = [i for i in resource["identifier"] if i.get("system") == SYSTEM]
        assert request["method"] == "PUT"
        assert request["url"] == fhirreport.conditional_url(resource["resourceType"], SYSTEM, ours["value"])
        assert request["url"].startswith(f"{resource['resourceType']}?identifier=https://hospital.example/")

    report = entries[-1]["resource"]
    DiagnosticReport.model_validate(report)
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert report["status"] == "preliminary"
    assert report["identifier"][0] == {"use": "official", "system": SYSTEM, "value": uid}
    assert (
        report["identifier"][1]["type"]["coding"][0]["code"] == "ACSN" and report["identifier"][1]["value"] == "ACC-1"
    )
    assert report["imagingStudy"][0]["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}
    assert report["subject"]["identifier"] == {
        "system": "urn:oid:1.2.3.4",
        "value": "PAT-1",
        "assigner": {"display": "HOSP"},
    }
    assert report["effectiveDateTime"] == "2026-03-04", "DICOM's local time has no offset: the date alone"
    assert report["issued"] == "2026-03-04T12:00:00Z"
    assert report["code"]["coding"][0] == {"system": SNOMED, "code": "399208008", "display": "Plain chest X-ray"}
    sct = codes.FINDING_CODES["pneumonia"]
    assert report["conclusionCode"][0]["coding"] == [{"system": SNOMED, "code": sct.value, "display": sct.meaning}]
    assert "research use only" in report["conclusion"] and "80.0 %" in report["conclusion"]
    assert {r["reference"] for r in report["result"]} == {e["fullUrl"] for e in entries[1:5]}

    device = entries[0]
    assert device["resource"]["version"] == [{"value": "cae-lstm-test-1"}]
    observations = _by_identifier([e["resource"] for e in entries[1:5]])
    for name in CLASS_NAMES:
        obs = observations[f"{uid}-probability-{name}"]
        assert obs["status"] == "preliminary" and obs["device"]["reference"] == device["fullUrl"]
        assert obs["code"]["coding"][0]["code"] == codes.PROBABILITY_CODES[name].value
        assert obs["valueQuantity"]["value"] == pytest.approx(100 * _report().probabilities[name])
        assert (obs["valueQuantity"]["system"], obs["valueQuantity"]["code"]) == ("http://unitsofmeasure.org", "%")
    finding = observations[f"{uid}-finding"]
    assert finding["code"]["coding"][0]["code"] == codes.FINDING.value == "121071"
    assert finding["valueCodeableConcept"]["coding"][0]["code"] == sct.value
    assert finding["interpretation"][0]["coding"][0]["code"] == "A"
    (priority,) = finding["component"]
    assert priority["valueCodeableConcept"]["coding"][0]["code"] == codes.HIGH_PRIORITY.value
    hl7_default = Settings().hl7.finding_values["pneumonia"]
    assert (hl7_default.code, hl7_default.system) == (sct.value, sct.scheme_designator), "SR, HL7 and FHIR agree"


def test_a_study_with_nothing_classified_says_so_without_a_coded_conclusion() -> None:
    report = _report(label=None, probabilities=None, model_version="", priority="review", observed_at="20260304")
    data = json.loads(fhirreport.bundle_json(report, FHIRSettings(), dt.datetime.now(dt.UTC)))
    Bundle.model_validate(data)
    kinds = [e["resource"]["resourceType"] for e in data["entry"]]
    assert kinds == ["Observation", "DiagnosticReport"], "no Device without a model, no probabilities"
    finding, diagnostic = (e["resource"] for e in data["entry"])
    assert finding["dataAbsentReason"]["coding"][0]["code"] == "not-performed" and "device" not in finding
    assert "conclusionCode" not in diagnostic and "no image of this study was classified" in diagnostic["conclusion"]


def test_a_finished_study_is_sent_and_a_reaggregated_study_updates_the_same_resources(make_harness) -> None:
    with fhir_server() as (url, store):
        harness = make_harness(fhir=_config(url))
        study_uid = pydicom.uid.generate_uid()
        harness.send([chest_dataset(seed=1, StudyInstanceUID=study_uid, **HEADER)])
        harness.work()
        (row,) = _rows(harness)
        assert (row.state, row.attempts, row.http_status, row.destination) == (db.FORWARD_SENT, 1, 200, url)
        (request,) = store.received
        assert request.headers["Content-Type"] == "application/fhir+json" and "Authorization" not in request.headers
        (report,) = store.of_type("DiagnosticReport")
        assert report["identifier"][0]["value"] == study_uid and report["meta"]["versionId"] == "1"
        assert report["identifier"][1]["value"] == "ACC-77"
        assert report["subject"]["identifier"]["value"] == "PAT-7"
        observations = {o["id"]: o for o in store.of_type("Observation")}
        assert len(observations) == 4 and len(store.of_type("Device")) == 1
        assert {r["reference"] for r in report["result"]} == {f"Observation/{i}" for i in observations}
        (device,) = store.of_type("Device")
        assert {o["device"]["reference"] for o in observations.values()} == {f"Device/{device['id']}"}
        with harness.sessions() as session:
            label = session.scalars(select(db.Study.label)).one()
        assert report["conclusionCode"][0]["coding"][0]["code"] == codes.FINDING_CODES[label].value

        harness.send([chest_dataset(seed=2, StudyInstanceUID=study_uid, **HEADER)])  # re-aggregated
        harness.work()
        first, second = _rows(harness)
        assert (first.state, second.state) == (db.FORWARD_SENT, db.FORWARD_SENT)
        assert len(store.received) == 2
        (updated,) = store.of_type("DiagnosticReport")
        assert updated["id"] == report["id"] and updated["meta"]["versionId"] == "2", "updated, not added"
        assert sorted(o["id"] for o in store.of_type("Observation")) == sorted(observations)
        assert len(store.of_type("Device")) == 1
        assert all(o["meta"]["versionId"] == "2" for o in store.of_type("Observation"))


def test_a_failed_send_is_retried_then_dead_lettered_and_forward_retry_resends(make_harness, capsys) -> None:
    with fhir_server(FHIRStore(failures=[503, 500])) as (url, store):
        harness = make_harness(
            fhir={**_config(url), "max_attempts": 2, "backoff_seconds": 5, "backoff_max_seconds": 60}
        )
        config = write_config(harness.tmp / "cxr.toml", harness.config)
        harness.send([chest_dataset(seed=3)])
        harness.work()
        (row,) = _rows(harness)
        assert (row.state, row.attempts, row.http_status) == (db.FORWARD_PENDING, 1, 503)
        assert "HTTP 503" in row.last_error and "told to fail" in row.last_error, "the OperationOutcome is kept"
        assert (row.next_attempt_at - row.updated_at).total_seconds() == retry_delay(1, 5, 60)
        assert fhir.process_due(harness.sessions, harness.settings.fhir) == [], "not due before the backoff"
        later = db.utcnow() + dt.timedelta(seconds=6)
        (outcome,) = fhir.process_due(harness.sessions, harness.settings.fhir, now=later)
        assert (outcome.state, outcome.attempts, outcome.http_status) == (db.FORWARD_DEAD, 2, 500)
        assert store.of_type("DiagnosticReport") == []

        assert main(["forward", "--json", "--config", str(config)]) == 0
        (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert (listed["kind"], listed["state"], listed["attempts"], listed["destination"]) == ("fhir", "dead", 2, url)
        assert main(["forward", "--config", str(config)]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        assert f"\tfhir:{url}\tdead\tattempts=2 HTTP 500\t" in line
        assert main(["forward", "--retry", "--json", "--config", str(config)]) == 0
        (resent,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert (resent["kind"], resent["state"], resent["attempts"], resent["http_status"]) == ("fhir", "sent", 1, 200)
        assert len(store.received) == 3 and store.received[0].body == store.received[2].body, "the same Bundle"
        assert len(store.of_type("DiagnosticReport")) == 1


def test_an_unreachable_server_is_retried_with_the_reason(make_harness) -> None:
    url = f"http://127.0.0.1:{free_port()}/fhir"
    harness = make_harness(fhir={**_config(url), "timeout": 2})
    harness.send([chest_dataset(seed=4)])
    harness.work()
    (row,) = _rows(harness)
    assert (row.state, row.attempts, row.http_status) == (db.FORWARD_PENDING, 1, None)
    assert "refused" in row.last_error.lower() and url in row.last_error


def test_an_answer_that_is_not_a_transaction_response_is_a_failure(make_harness) -> None:
    with fhir_server(FHIRStore(failures=[200])) as (url, store):  # 200 with an OperationOutcome
        harness = make_harness(fhir={**_config(url), "backoff_seconds": 1})
        harness.send([chest_dataset(seed=12)])
        harness.work()
        (row,) = _rows(harness)
        assert (row.state, row.http_status) == (db.FORWARD_PENDING, 200)
        assert "not a transaction-response Bundle" in row.last_error
        later = db.utcnow() + dt.timedelta(seconds=2)
        (outcome,) = fhir.process_due(harness.sessions, harness.settings.fhir, now=later)
        assert (outcome.state, outcome.attempts) == (db.FORWARD_SENT, 2)
        assert len(store.of_type("DiagnosticReport")) == 1


def test_a_redirect_is_not_followed_and_says_where_it_pointed(make_harness) -> None:
    with fhir_server(FHIRStore(failures=[307])) as (url, store):
        harness = make_harness(fhir=_config(url))
        harness.send([chest_dataset(seed=10)])
        harness.work()
        (row,) = _rows(harness)
        assert (row.state, row.http_status) == (db.FORWARD_PENDING, 307)
        assert f"redirected to {url}" in row.last_error
        assert len(store.received) == 1 and store.of_type("DiagnosticReport") == [], "not resent to the new place"


def test_a_study_without_patient_id_is_dead_with_the_reason_and_not_resent(make_harness, capsys) -> None:
    with fhir_server() as (url, store):
        harness = make_harness(fhir=_config(url))
        config = write_config(harness.tmp / "cxr.toml", harness.config)
        harness.send([chest_dataset(seed=11, PatientID="")])
        harness.work()
        (row,) = _rows(harness)
        assert row.state == db.FORWARD_DEAD and row.bundle is None and "no Patient ID" in row.last_error
        assert main(["forward", "--retry", "--config", str(config)]) == 1
        assert "FHIR report(s) could not be built" in capsys.readouterr().err
        assert _rows(harness)[0].state == db.FORWARD_DEAD and store.received == []


def test_a_bearer_token_from_the_environment_and_a_password_from_a_file_are_sent_and_never_logged(
    make_harness, monkeypatch, tmp_path: Path, caplog
) -> None:
    caplog.set_level("DEBUG", logger="cxr_triage")
    token, password = "tok-3f9a-SECRET", "pw-77-SECRET"
    monkeypatch.setenv("CXR_TEST_FHIR_TOKEN", token)
    secret_file = tmp_path / "fhir-password"
    secret_file.write_text(password + "\n")
    basic = "Basic " + base64.b64encode(f"cxr:{password}".encode()).decode()
    with (
        fhir_server(FHIRStore(authorization=f"Bearer {token}")) as (bearer_url, bearer_store),
        fhir_server(FHIRStore(authorization=basic)) as (basic_url, basic_store),
    ):
        destinations = [
            {"url": bearer_url, "bearer_token_env": "CXR_TEST_FHIR_TOKEN"},
            {"url": basic_url, "username": "cxr", "password_file": str(secret_file)},
        ]
        harness = make_harness(fhir={"destinations": destinations, "timeout": 10})
        fhir.check_settings(harness.settings)
        harness.send([chest_dataset(seed=5)])
        harness.work()
        assert [(r.destination, r.state) for r in _rows(harness)] == [(bearer_url, "sent"), (basic_url, "sent")]
        assert len(bearer_store.of_type("DiagnosticReport")) == len(basic_store.of_type("DiagnosticReport")) == 1

        monkeypatch.setenv("CXR_TEST_FHIR_TOKEN", "a-wrong-token")
        harness.send([chest_dataset(seed=6)])
        harness.work()
        refused = _rows(harness)[2]
        assert (refused.state, refused.http_status) == (db.FORWARD_PENDING, 401)

        monkeypatch.delenv("CXR_TEST_FHIR_TOKEN")
        with pytest.raises(ConfigError, match="CXR_TEST_FHIR_TOKEN is not set"):
            fhir.check_settings(harness.settings)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "FHIR report of study" in logged
    assert token not in logged and password not in logged and "a-wrong-token" not in logged
    assert "SECRET" not in json.dumps(status.collect(harness.engine, harness.settings, 3600)), "status shows no secret"


def test_https_is_verified_against_the_configured_ca_bundle(make_harness, tmp_path: Path) -> None:
    ca, server_tls = make_ca_and_server_certificate(tmp_path)
    with fhir_server(tls=server_tls) as (url, store):
        assert url.startswith("https://")
        untrusted = make_harness(fhir=_config(url))
        untrusted.send([chest_dataset(seed=7)])
        untrusted.work()
        (row,) = _rows(untrusted)
        assert row.state == db.FORWARD_PENDING and "CERTIFICATE_VERIFY_FAILED" in row.last_error
        assert store.received == []

        trusted = make_harness(fhir=_config(url, tls_ca_file=str(ca)))
        trusted.send([chest_dataset(seed=8)])
        trusted.work()
        (row,) = _rows(trusted)
        assert (row.state, row.http_status) == (db.FORWARD_SENT, 200)
        assert len(store.of_type("DiagnosticReport")) == 1


def test_status_and_metrics_count_the_fhir_outbox(make_harness, capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}/fhir"
    harness = make_harness(fhir={**_config(url), "max_attempts": 1})
    harness.send([chest_dataset(seed=9)])
    harness.work()
    assert [r.state for r in _rows(harness)] == [db.FORWARD_DEAD]
    report = status.collect(harness.engine, harness.settings, 3600)
    assert report["outboxes"]["fhir"] == {"pending": 0, "sent": 0, "dead": 1}
    config = write_config(harness.tmp / "cxr.toml", harness.config)
    assert main(["status", "--config", str(config)]) == 1, "a dead report is a problem"
    assert "fhir: 0 pending, 0 sent, 1 dead" in capsys.readouterr().out.splitlines()
    assert any("1 FHIR reports dead-lettered" in p and "forward --retry" in p for p in report["problems"])
    web = TestClient(create_app(harness.settings, harness.engine), base_url="http://ops.test")
    response = web.get("/metrics")
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    counted = {s.labels["state"]: s.value for s in families["cxr_triage_fhir_reports"].samples if "state" in s.labels}
    assert counted.get("dead") == 1


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"destinations": [{"url": "ftp://fhir"}]}, "expected the server's base URL"),
        ({"destinations": [{"url": "https://u:p@fhir/r4"}]}, "must not hold credentials"),
        ({"destinations": [{"url": "https://fhir", "token": "x"}]}, "unknown keys ['token']"),
        ({"destinations": [{"url": "https://fhir", "bearer_token_env": "A", "username": "u"}]}, "choose one"),
        ({"destinations": [{"url": "https://fhir", "username": "u"}]}, "needs username and password_env"),
        ({"destinations": [{"url": "https://a"}, {"url": "https://a/"}]}, "named twice"),
        ({"identifier_system": "cxr triage"}, "absolute URI"),
        ({"max_attempts": 0}, "max_attempts must be >= 1"),
    ],
)
def test_configuration_errors_name_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        FHIRSettings.from_table(table)
    assert message in str(raised.value) and "[fhir]" in str(raised.value)


def test_an_unreadable_secret_or_ca_file_stops_the_start_up(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    for destination, message in (
        ({"url": "https://fhir", "username": "u", "password_file": str(missing)}, "cannot read the password file"),
        ({"url": "https://fhir", "tls_ca_file": str(missing)}, "destinations[0] (https://fhir)"),
    ):
        settings = Settings.from_values(config_values(tmp_path, None, fhir={"destinations": [destination]}))
        with pytest.raises(ConfigError) as raised:
            fhir.check_settings(settings)
        assert message in str(raised.value)


def test_the_test_server_refuses_what_a_fhir_server_would() -> None:
    """The checks the other tests rely on: an invalid resource, a dangling reference and a second match are refused."""
    good = json.loads(fhirreport.bundle_json(_report(), FHIRSettings(), dt.datetime.now(dt.UTC)))
    store = FHIRStore()
    assert apply_transaction(store, good)[0] == 200 and len(store.of_type("Observation")) == 4

    bad_value = json.loads(json.dumps(good))
    bad_value["entry"][1]["resource"]["valueQuantity"]["value"] = "eighty"
    with pytest.raises(ValueError):
        apply_transaction(FHIRStore(), bad_value)
    unknown = json.loads(json.dumps(good))
    unknown["entry"][1]["resource"]["probability"] = 0.8
    with pytest.raises(ValueError):
        apply_transaction(FHIRStore(), unknown)
    dangling = json.loads(json.dumps(good))
    dangling["entry"][-1]["resource"]["result"].append({"reference": "urn:uuid:00000000-0000-0000-0000-000000000000"})
    status_code, outcome = apply_transaction(FHIRStore(), dangling)
    assert status_code == 400 and "resolve to nothing" in outcome["issue"][0]["diagnostics"]
    report = store.of_type("DiagnosticReport")[0]
    store.resources["DiagnosticReport"]["copy"] = {**report, "id": "copy"}
    assert apply_transaction(store, good)[0] == 412
