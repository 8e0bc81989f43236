"""DICOMweb (issue 32): the STOW-RS endpoint (in) against a real HTTP client, and STOW-RS of the SRs (out) with its
retries, dead letter and ``forward --retry``, against this node's own endpoint; ``status`` and ``/metrics`` count
the outbox. Orthanc with its DICOMweb plugin, in a network namespace, is ``tests/test_dicomweb_orthanc.py``.

The client writes its bodies with a function of its own (``mime_body``), not with the sender's
``multipart_related``, so that the endpoint is tested against a second writer of RFC 2387 (the standard library's
``email`` generator cannot: it rewrites line ends inside binary parts).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import secrets
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import Harness, chest_dataset, config_values, free_port, write_config
from pydicom.dataset import Dataset
from sqlalchemy import select

from cxr_triage.core import db
from cxr_triage.core.dicomweb import DicomwebServer, DicomwebSettings, Secret
from cxr_triage.dicom import multipart, stow
from cxr_triage.files import TEMP_PREFIX
from cxr_triage.outputs import dicomweb
from cxr_triage.testing import peers

TOKEN_ENV = "CXR_TEST_STOW_TOKEN"
TOKEN = "test-token-0123456789abcdef"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def mime_body(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """A multipart/related body as other clients write it (a preamble, headers besides Content-Type, transport
    padding after a delimiter, an epilogue), and its Content-Type with an unquoted boundary."""
    boundary = f"client{secrets.token_hex(8)}"
    body = b"a preamble the endpoint must skip\r\n"
    for data in parts:
        body += f"--{boundary} \t\r\nContent-Type: application/dicom\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\nan epilogue\r\n".encode()
    return body, f"multipart/related; boundary={boundary}; type=application/dicom"


def post(
    port: int,
    parts: Sequence[bytes],
    token: str | None = TOKEN,
    content_type: str | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """POST /studies with a real HTTP client (over TLS with ``context``); the status and the parsed JSON answer
    (or the text)."""
    body, mime_type = mime_body(parts)
    headers = {"Content-Type": content_type or mime_type, "Accept": "application/dicom+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    scheme = "https" if context else "http"
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/studies", body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, json.loads(text) if exc.headers.get("content-type", "").startswith(stow.DICOM_JSON) else text


def stow_settings(port: int, **values: Any) -> DicomwebSettings:
    table = {"stow_enabled": True, "stow_port": port, "stow_token_env": TOKEN_ENV, **values}
    return DicomwebSettings.from_table(table)


@pytest.fixture
def stow_node(
    make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[Harness, stow.StowServer]]]:
    """A listener harness and a STOW-RS endpoint on its receiver (the two ``serve`` runs), on free ports."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    servers: list[stow.StowServer] = []

    def make(**values: Any) -> tuple[Harness, stow.StowServer]:
        harness = make_harness(**values.pop("harness", {}))
        server = stow.StowServer(stow_settings(0, **values), harness.listener.receiver)
        server.start()
        servers.append(server)
        return harness, server

    yield make
    for server in servers:
        server.stop()


def referenced(answer: dict[str, Any]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in answer.get("00081199", {}).get("Value", [])]


def failed(answer: dict[str, Any]) -> dict[str | None, int]:
    return {
        item.get("00081155", {}).get("Value", [None])[0]: item["00081197"]["Value"][0]
        for item in answer.get("00081198", {}).get("Value", [])
    }


def instances(harness: Harness) -> list[db.Instance]:
    with harness.sessions() as session:
        return list(session.scalars(select(db.Instance).order_by(db.Instance.id)))


def stray_temporaries(harness: Harness) -> list[Path]:
    return list(Path(harness.settings.storage.spool_dir).rglob(f"{TEMP_PREFIX}*"))


# --- the multipart body ------------------------------------------------------------------------------------


def test_the_reader_gives_back_the_parts_of_a_body_in_any_chunking() -> None:
    rng = random.Random(7)
    parts = [bytes(rng.randrange(256) for _ in range(n)) for n in (0, 1, 5000)]
    parts.append(b"\r\n--almost-a-boundary\r\n--\r\n")
    body, content_type = dicomweb.multipart_related(parts, boundary="b0undary")
    assert content_type == 'multipart/related; type="application/dicom"; boundary="b0undary"'
    for size in (1, 3, 70, 4096, len(body)):
        reader = multipart.MultipartReader("b0undary")
        got: list[bytearray] = []
        headers: list[dict[str, str]] = []
        for start in range(0, len(body), size):
            for event in reader.feed(body[start : start + size]):
                if isinstance(event, multipart.PartStart):
                    got.append(bytearray())
                    headers.append(event.headers)
                elif isinstance(event, multipart.PartData):
                    got[-1] += event.data
        reader.finish()
        assert [bytes(g) for g in got] == parts, size
        assert headers == [{"content-type": "application/dicom"}] * len(parts)


def test_the_reader_refuses_a_body_that_breaks_the_syntax() -> None:
    body, _ = dicomweb.multipart_related([b"abc"], boundary="xyz")
    cut = multipart.MultipartReader("xyz")
    cut.feed(body[:-8])
    with pytest.raises(multipart.MultipartError, match="without the closing delimiter"):
        cut.finish()
    with pytest.raises(multipart.MultipartError, match="Name: value"):
        multipart.MultipartReader("xyz").feed(b"--xyz\r\nnot a header\r\n\r\nabc\r\n--xyz--\r\n")
    with pytest.raises(multipart.MultipartError, match="boundary"):
        multipart.MultipartReader("bad\nboundary")


def test_the_senders_reading_of_an_answer_matches_the_endpoints_answer() -> None:
    outcomes = [stow.Outcome(None, "1.2.3", "1.2.3.4"), stow.Outcome(0xA700, "1.2.3", "1.2.3.5"), stow.Outcome(0xC210)]
    status, body = stow.response_body(outcomes)
    assert status == 202
    assert dicomweb.stored_and_failed(body) == ({"1.2.3.4"}, {"1.2.3.5": 0xA700})
    odd = {"00081198": {"vr": "SQ", "Value": [{"00081155": {"Value": ["9.9"]}, "00081197": {"Value": ["x"]}}, 7]}}
    assert dicomweb.stored_and_failed([odd]) == (set(), {"9.9": 0})
    assert dicomweb.stored_and_failed("not JSON of a dataset") == (set(), {})
    assert stow.response_body(outcomes[:1])[0] == 200
    assert stow.response_body(outcomes[1:])[0] == 409


# --- STOW-RS in --------------------------------------------------------------------------------------------


def test_a_stored_instance_is_spooled_and_recorded_before_the_answer_and_then_classified(stow_node) -> None:
    harness, server = stow_node()
    ds = chest_dataset(seed=1, AccessionNumber="ACC-STOW")
    status, answer = post(server.address[1], [part10(ds)])

    assert status == 200
    assert referenced(answer) == [ds.SOPInstanceUID] and "00081198" not in answer
    [row] = instances(harness)  # recorded before the answer: the worker has not run
    assert (row.sop_instance_uid, row.status, row.calling_ae) == (ds.SOPInstanceUID, db.QUEUED, "STOW-RS")
    assert Path(row.spool_path).read_bytes() == part10(ds)
    assert stray_temporaries(harness) == []
    # The same bytes again: stored (a retry of an answer that was lost), nothing new recorded.
    assert post(server.address[1], [part10(ds)])[0] == 200
    assert len(instances(harness)) == 1
    assert harness.work() == 1
    [result] = harness.rows()
    assert (result["sop_instance_uid"], result["status"]) == (ds.SOPInstanceUID, "ok")
    with harness.sessions() as session:
        assert session.scalars(select(db.Study.accession_number)).one() == "ACC-STOW"


def test_refusals_have_the_listeners_reasons_and_the_answer_says_which_were_stored(stow_node) -> None:
    harness, server = stow_node()
    good = chest_dataset(seed=2)
    ct = chest_dataset(seed=3, SOPClassUID=CT_IMAGE_STORAGE)
    no_study = chest_dataset(seed=4, StudyInstanceUID=None)
    lateral = chest_dataset(seed=5, ViewPosition="LL")  # refused for its content: stored, as by C-STORE
    status, answer = post(server.address[1], [part10(ds) for ds in (good, ct, no_study, lateral)] + [b"not DICOM"])

    assert status == 202
    assert referenced(answer) == [good.SOPInstanceUID, lateral.SOPInstanceUID]
    assert failed(answer) == {
        ct.SOPInstanceUID: stow.SOP_CLASS_NOT_SUPPORTED,
        no_study.SOPInstanceUID: 0xC211,
        None: 0xC210,
    }
    assert [r.sop_instance_uid for r in instances(harness)] == [good.SOPInstanceUID, lateral.SOPInstanceUID]
    assert stray_temporaries(harness) == []
    status, answer = post(server.address[1], [part10(ct)])
    assert status == 409 and failed(answer) == {ct.SOPInstanceUID: stow.SOP_CLASS_NOT_SUPPORTED}
    harness.work()
    assert {r["sop_instance_uid"]: r["status"] for r in harness.rows()} == {
        good.SOPInstanceUID: "ok",
        lateral.SOPInstanceUID: "rejected",
    }


def test_below_the_spool_reserve_nothing_is_stored_and_each_instance_is_named(stow_node) -> None:
    harness, server = stow_node(harness={"storage": {"min_free_mb": 10**9}})
    ds = chest_dataset(seed=12)
    status, answer = post(server.address[1], [part10(ds)])
    assert status == 409 and failed(answer) == {ds.SOPInstanceUID: stow.OUT_OF_RESOURCES}
    assert instances(harness) == [] and stray_temporaries(harness) == []


def test_stow_rs_takes_none_of_the_listeners_association_slots(stow_node) -> None:
    from pynetdicom import AE, build_context

    harness, server = stow_node(harness={"listener": {"max_associations": 1}})
    by_dicom, by_web = chest_dataset(seed=13), chest_dataset(seed=14)
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.requested_contexts = [build_context(str(by_dicom.SOPClassUID), [str(by_dicom.file_meta.TransferSyntaxUID)])]
    assoc = ae.associate("127.0.0.1", harness.port, ae_title="CXR_TRIAGE")
    assert assoc.is_established  # the listener's only slot, held open
    try:
        assert post(server.address[1], [part10(by_web)])[0] == 200
        assert int(assoc.send_c_store(by_dicom).Status) == 0x0000
    finally:
        assoc.release()
    assert {r.calling_ae for r in instances(harness)} == {"STOW-RS", "TESTSCU"}


def test_an_instance_over_the_size_cap_is_not_kept_and_is_named(stow_node) -> None:
    harness, server = stow_node(stow_max_instance_mb=0.02)  # about 20 KiB
    small, large = chest_dataset(seed=6), chest_dataset(rows=256, cols=256, seed=7)
    status, answer = post(server.address[1], [part10(large), part10(small)])

    assert status == 202
    assert failed(answer) == {large.SOPInstanceUID: stow.OUT_OF_RESOURCES}
    assert referenced(answer) == [small.SOPInstanceUID]
    assert [r.sop_instance_uid for r in instances(harness)] == [small.SOPInstanceUID]
    assert stray_temporaries(harness) == []


def test_a_body_over_the_request_cap_is_refused_whether_announced_or_streamed(stow_node) -> None:
    harness, server = stow_node(stow_max_request_mb=0.05)  # about 50 KiB
    body, content_type = mime_body([part10(chest_dataset(rows=256, cols=256, seed=8))])
    assert post(server.address[1], [body])[0] == 413  # Content-Length over the cap: refused before reading

    connection = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=60)
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
    connection.request("POST", "/studies", body=chunks, headers=headers, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413  # no Content-Length: counted as it streams and cut at the cap
    connection.close()
    assert instances(harness) == [] and stray_temporaries(harness) == []


def test_a_body_that_breaks_the_multipart_syntax_is_answered_400(stow_node) -> None:
    harness, server = stow_node()
    first, second = chest_dataset(seed=15), chest_dataset(seed=16)
    body, content_type = mime_body([part10(first), part10(second)])
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    cut_in_second = body[: body.rindex(b"--client") - 100]
    for broken in (cut_in_second, b"only a preamble, no part\r\n"):
        connection = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=60)
        connection.request("POST", "/studies", body=broken, headers=headers)
        response = connection.getresponse()
        assert response.status == 400, response.read()
        connection.close()
    # The part completed before the syntax broke was stored and recorded (sending again is a no-op); the part cut
    # short was not kept.
    assert [r.sop_instance_uid for r in instances(harness)] == [first.SOPInstanceUID]
    assert post(server.address[1], [part10(first)])[0] == 200 and len(instances(harness)) == 1
    assert stray_temporaries(harness) == []


def test_who_may_store_token_network_and_media_type(stow_node) -> None:
    harness, server = stow_node()
    data = [part10(chest_dataset(seed=9))]
    port = server.address[1]
    assert post(port, data, token=None)[0] == 401
    assert post(port, data, token="wrong-token")[0] == 401
    assert post(port, data, content_type='multipart/related; type="application/dicom+json"; boundary=x')[0] == 415
    assert instances(harness) == []

    _, elsewhere = stow_node(stow_allowed_networks=["10.0.0.0/8"])
    assert post(elsewhere.address[1], data)[0] == 403
    body, content_type = mime_body(data)
    connection = http.client.HTTPConnection("127.0.0.1", elsewhere.address[1], timeout=60)
    spoofed = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "10.1.2.3"}
    connection.request("POST", "/studies", body=body, headers=spoofed)
    assert connection.getresponse().status == 403, "the network is the TCP peer's, not a header's"
    connection.close()


def self_signed(folder: Path, name: str) -> tuple[str, str]:
    """A throw-away self-signed certificate for 127.0.0.1: (certificate, private key) paths."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


def test_https_with_client_certificates_in_and_a_ca_bundle_out(stow_node, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "stow")
    sender_cert, sender_key = self_signed(tmp_path, "sender")
    harness, guarded = stow_node(stow_tls_certificate=cert, stow_tls_private_key=key, stow_tls_ca_file=sender_cert)
    data = [part10(chest_dataset(seed=30))]
    with_certificate = ssl.create_default_context(cafile=cert)
    with_certificate.load_cert_chain(sender_cert, sender_key)
    assert post(guarded.address[1], data, context=with_certificate)[0] == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        post(guarded.address[1], [part10(chest_dataset(seed=31))], context=ssl.create_default_context(cafile=cert))
    assert len(instances(harness)) == 1

    # Out: an https destination verified against [dicomweb] tls_ca_file, with its bearer token.
    _, server = stow_node(stow_tls_certificate=cert, stow_tls_private_key=key)
    target = DicomwebServer("tls", f"https://127.0.0.1:{server.address[1]}", token=Secret(env=TOKEN_ENV))
    trusted = dicomweb.tls_context(DicomwebSettings(tls_ca_file=cert))
    status, answer = dicomweb.stow(target, [part10(chest_dataset(seed=32))], 30, trusted)
    assert status == 200 and len(dicomweb.stored_and_failed(answer)[0]) == 1
    with pytest.raises(dicomweb.StowError, match="CERTIFICATE_VERIFY_FAILED"):
        dicomweb.stow(target, [part10(chest_dataset(seed=33))], 30, dicomweb.tls_context(DicomwebSettings()))


def test_the_endpoint_needs_an_allow_list_and_one_secret_source() -> None:
    with pytest.raises(ValueError, match="allow-list"):
        DicomwebSettings.from_table({"stow_enabled": True})
    with pytest.raises(ValueError, match="not both"):
        Secret(env="A", file="/b")
    with pytest.raises(ValueError, match="empty or unset"):
        Secret(env="CXR_TEST_NO_SUCH_VARIABLE").read()
    from cxr_triage.core.settings import load_settings

    environ = {"CXR_TRIAGE_DICOMWEB_STOW_MAX_INSTANCE_MB": "0.5", "CXR_TRIAGE_DICOMWEB_TIMEOUT": "5"}
    settings = load_settings(None, environ=environ).dicomweb
    assert (settings.stow_max_instance_mb, settings.timeout, settings.stow_enabled) == (0.5, 5.0, False)


def test_a_destination_whose_secret_cannot_be_read_stops_the_commands_that_send(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    values = config_values(
        tmp_path, None, dicomweb={"destinations": [{"name": "pacs", "url": "https://pacs", "token_file": str(missing)}]}
    )
    config = write_config(tmp_path / "cxr.toml", values)
    peers.cli("db", "upgrade", config=config)
    done = peers.cli("forward", "--retry", config=config, check=False)
    assert done.returncode != 0
    assert f"[dicomweb] destination pacs: cannot read the secret's file {missing}" in done.stderr
    missing.write_text("a-token\n")
    assert peers.cli("forward", "--retry", config=config, check=False).returncode == 0


# --- STOW-RS out -------------------------------------------------------------------------------------------


def destination(port: int) -> dict[str, str]:
    return {"name": "archive", "url": f"http://127.0.0.1:{port}", "token_env": TOKEN_ENV}


def outbox(harness: Harness) -> list[tuple[str, int, int | None]]:
    with harness.sessions() as session:
        rows = session.scalars(select(db.DicomwebStore).order_by(db.DicomwebStore.id))
        return [(r.state, r.attempts, r.status) for r in rows]


def metrics_states(harness: Harness) -> dict[str, float]:
    """The STOW-RS outbox as ``/metrics`` of the worklist app shows it, by state."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from cxr_triage.web.app import create_app

    with TestClient(create_app(harness.settings, harness.engine), base_url="http://ops.test") as web:
        response = web.get("/metrics")
    assert response.status_code == 200, response.text
    [family] = [f for f in text_string_to_metric_families(response.text) if f.name == "cxr_triage_dicomweb_stores"]
    return {s.labels["state"]: s.value for s in family.samples if s.name == "cxr_triage_dicomweb_stores"}


def test_srs_go_out_by_stow_rs_with_retries_dead_letter_and_forward_retry(stow_node) -> None:
    closed = free_port()
    harness, server = stow_node(
        harness={"dicomweb": {"destinations": [destination(closed)], "max_attempts": 2, "backoff_seconds": 0}}
    )
    assert harness.send([chest_dataset(seed=10)]) == [0x0000]
    harness.work()  # classified, its SR's STOW-RS row added and tried once: nothing listens there
    assert outbox(harness) == [(db.FORWARD_PENDING, 1, None)]
    with harness.sessions() as session:
        assert "Connection refused" in session.scalars(select(db.DicomwebStore.last_error)).one()
    harness.work()
    assert outbox(harness) == [(db.FORWARD_DEAD, 2, None)]
    config = {**harness.config, "dicomweb": {**harness.config["dicomweb"], "destinations": [destination(closed)]}}
    config_path = write_config(harness.tmp / "node.toml", config)
    report = json.loads(peers.cli("status", "--json", config=config_path, check=False).stdout)
    assert report["outboxes"]["dicomweb"] == {"pending": 0, "sent": 0, "dead": 1}
    assert any("1 SR STOW-RS deliveries dead-lettered" in p for p in report["problems"]), report["problems"]
    assert "dicomweb: 0 pending, 0 sent, 1 dead" in peers.cli("status", config=config_path, check=False).stdout
    listed = peers.cli("forward", config=config_path).stdout
    assert "\tdicomweb:archive\tdead\tattempts=2" in listed
    assert metrics_states(harness) == {"pending": 0.0, "sent": 0.0, "dead": 1.0}

    # `forward --retry` to this node's own endpoint, which answers 202: it stores the heatmap Secondary Capture sent
    # first (the listener takes that class, to refuse it when classifying) but not the SR, a class it does not take.
    config["dicomweb"]["destinations"] = [destination(server.address[1])]
    write_config(config_path, config)
    done = peers.cli("forward", "--retry", "--json", config=config_path, check=False)
    assert done.returncode == 1, done.stderr
    [record] = [json.loads(line) for line in done.stdout.splitlines()]
    assert (record["kind"], record["state"], record["attempts"], record["status"]) == ("dicomweb", "pending", 1, 202)
    assert record["detail"] == "HTTP 202: failed, Failure Reason 0x0122"
    assert outbox(harness) == [(db.FORWARD_PENDING, 1, 202)]


# --- nothing acknowledged is lost ----------------------------------------------------------------------------


def test_instances_acknowledged_by_stow_rs_survive_a_sigkill(tmp_path: Path, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the serve processes inherit it
    stow_port = free_port()
    values = config_values(
        tmp_path,
        tiny_model,
        worker={"processes": 0},
        dicomweb={"stow_enabled": True, "stow_port": stow_port, "stow_token_env": TOKEN_ENV},
    )
    config = write_config(tmp_path / "cxr.toml", values)
    url = values["database"]["url"]
    good, lateral = chest_dataset(seed=20), chest_dataset(seed=21, ViewPosition="LL")
    with peers.Server(config, values["listener"]["port"], log=tmp_path / "serve.log") as server:
        assert server.proc is not None
        status, answer = post(stow_port, [part10(good), part10(lateral)])
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    assert status == 200 and referenced(answer) == [good.SOPInstanceUID, lateral.SOPInstanceUID]
    engine = db.make_engine(url)
    with db.read_session(engine) as session:
        assert list(session.scalars(select(db.Instance.status))) == [db.QUEUED, db.QUEUED], "answered = recorded"
    engine.dispose()
    # A SIGKILL in the middle of a part leaves its temporary file: removed at start-up, never classified.
    partial = Path(values["storage"]["spool_dir"]) / f"{TEMP_PREFIX}killed.stow"
    partial.write_bytes(part10(chest_dataset(seed=22))[:3000])

    values["worker"]["processes"] = 1
    write_config(config, values)
    with peers.Server(config, values["listener"]["port"], log=tmp_path / "serve.log"):
        rows = peers.wait_until(
            lambda: (r := peers.results(config)) and all(x["status"] not in ("queued", "processing") for x in r) and r,
            120,
            "both instances to be classified or refused after the restart",
            interval=0.5,
        )
    outcome = {r["sop_instance_uid"]: (r["status"], r["reason"]) for r in rows}
    assert outcome[good.SOPInstanceUID] == ("ok", None)
    assert outcome[lateral.SOPInstanceUID][0] == "rejected"
    assert "ViewPosition (0018,5101) is 'LL'" in outcome[lateral.SOPInstanceUID][1]
    assert len(outcome) == 2 and not partial.exists()


def test_the_dicomweb_migration_goes_down_and_up(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import inspect

    engine = db.make_engine(f"sqlite:///{tmp_path / 'dw.sqlite'}")
    db.upgrade(engine)
    assert "dicomweb_stores" in inspect(engine).get_table_names()
    command.downgrade(db.alembic_config(engine), "0012")
    assert "dicomweb_stores" not in inspect(engine).get_table_names()
    db.upgrade(engine)
    assert "dicomweb_stores" in inspect(engine).get_table_names()
    engine.dispose()


def test_a_request_in_progress_at_sigterm_is_answered_before_serve_stops(
    tmp_path: Path, tiny_model: Path, monkeypatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    stow_port = free_port()
    values = config_values(
        tmp_path,
        tiny_model,
        worker={"processes": 0},
        dicomweb={"stow_enabled": True, "stow_port": stow_port, "stow_token_env": TOKEN_ENV},
    )
    config = write_config(tmp_path / "cxr.toml", values)
    ds = chest_dataset(seed=40)
    body, content_type = mime_body([part10(ds)])
    half = len(body) // 2
    with peers.Server(config, values["listener"]["port"], log=tmp_path / "serve.log") as server:
        assert server.proc is not None
        connection = http.client.HTTPConnection("127.0.0.1", stow_port, timeout=60)
        connection.putrequest("POST", "/studies")
        for name, value in (("Content-Type", content_type), ("Authorization", f"Bearer {TOKEN}")):
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body[:half])
        peers.wait_until(lambda: "STOW-RS endpoint on" in (tmp_path / "serve.log").read_text(), 30, "the endpoint")
        os.killpg(server.proc.pid, signal.SIGTERM)
        peers.wait_until(lambda: "shutting down" in (tmp_path / "serve.log").read_text(), 30, "serve to stop")
        connection.send(body[half:])
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert server.proc.wait(60) == 0
    assert response.status == 200 and referenced(answer) == [ds.SOPInstanceUID]
    engine = db.make_engine(values["database"]["url"])
    with db.read_session(engine) as session:
        assert list(session.scalars(select(db.Instance.sop_instance_uid))) == [ds.SOPInstanceUID]
    engine.dispose()
