"""DICOMweb out with the heatmap objects (issue 32 point 2, after issue 31): each STOW-RS request carries a row's
heatmap Secondary Capture before its SR, the row is ``sent`` only when the answer lists both as stored, a server
that fails only the heatmap object gets both again at the retry (dead letter and ``forward --retry`` as before), a
server that takes no Secondary Captures (Failure Reason 0x0122) still gets the SR, with a warning, and without a
heatmap object only the SR goes.

The receiver is a small STOW-RS server in the test (``Archive``): this node's own endpoint takes images only, so it
would refuse both parts. It reads the bodies with the endpoint's multipart reader and answers with the endpoint's
``response_body``; real listener, worker and SQLite for the sending side.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import Harness, chest_dataset, write_config
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select
from test_dicomweb import TOKEN, TOKEN_ENV, destination, outbox

from cxr_triage.core import db
from cxr_triage.dicom import multipart, stow
from cxr_triage.outputs import dicomweb
from cxr_triage.testing import peers

SC, SR = str(SecondaryCaptureImageStorage), str(ComprehensiveSRStorage)


class Archive:
    """A STOW-RS server on 127.0.0.1 that stores every part except those of a SOP class in ``refuse`` (failed with
    the reason given). The test thread sets ``refuse``; the server thread appends to ``requests`` (per request, the
    (SOP class, SOP instance) of each part in order) and ``authorizations``."""

    def __init__(self) -> None:
        self.refuse: dict[str, int] = {}
        self.requests: list[list[tuple[str, str]]] = []
        self.authorizations: list[str | None] = []
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                datasets = [pydicom.dcmread(io.BytesIO(p)) for p in parts(self.headers["Content-Type"], body)]
                archive.authorizations.append(self.headers.get("Authorization"))
                archive.requests.append([(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in datasets])
                outcomes = [
                    stow.Outcome(archive.refuse.get(str(d.SOPClassUID)), str(d.SOPClassUID), str(d.SOPInstanceUID))
                    for d in datasets
                ]
                status, answer = stow.response_body(outcomes)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


def parts(content_type: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body, read with the endpoint's reader."""
    _, params = multipart.parse_content_type(content_type)
    reader = multipart.MultipartReader(params["boundary"])
    found: list[bytearray] = []
    for event in reader.feed(body):
        if isinstance(event, multipart.PartStart):
            found.append(bytearray())
        elif isinstance(event, multipart.PartData):
            found[-1] += event.data
    reader.finish()
    return [bytes(f) for f in found]


@pytest.fixture
def archive() -> Iterator[Archive]:
    server = Archive()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def node(
    make_harness: Callable[..., Harness], archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Harness]:
    """A harness whose one ``[dicomweb]`` destination is ``archive`` (no ``[forward]`` destination)."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)

    def make(**values: Any) -> Harness:
        table = {"destinations": [destination(archive.port)], "max_attempts": 2, "backoff_seconds": 0}
        return make_harness(dicomweb={**table, **values.pop("dicomweb", {})}, **values)

    return make


def sr_row(harness: Harness) -> db.SRDocument:
    with harness.sessions() as session:
        row = session.scalars(select(db.SRDocument)).one()
        session.expunge(row)
    return row


def last_error(harness: Harness) -> str | None:
    with harness.sessions() as session:
        return session.scalars(select(db.DicomwebStore.last_error)).one()


def test_the_heatmap_object_goes_first_in_the_sr_s_request_and_the_row_is_sent_when_both_are_stored(
    node, archive: Archive
) -> None:
    harness = node()
    assert harness.send([chest_dataset(seed=50)]) == [0x0000]
    harness.work()
    row = sr_row(harness)
    assert row.heatmap_sop_instance_uid and row.heatmap_path
    assert archive.requests == [[(SC, row.heatmap_sop_instance_uid), (SR, row.sop_instance_uid)]]
    assert archive.authorizations == [f"Bearer {TOKEN}"]
    assert outbox(harness) == [(db.FORWARD_SENT, 1, 200)]


def test_a_heatmap_object_the_server_fails_keeps_the_row_until_both_are_stored_dead_letter_and_retry(
    node, archive: Archive
) -> None:
    harness = node()
    archive.refuse[SC] = 0xA700  # out of resources for the Secondary Capture only: a 202
    harness.send([chest_dataset(seed=51)])
    harness.work()
    row = sr_row(harness)
    both = [(SC, row.heatmap_sop_instance_uid), (SR, row.sop_instance_uid)]
    assert outbox(harness) == [(db.FORWARD_PENDING, 1, 202)]
    assert last_error(harness) == "heatmap object: HTTP 202: failed, Failure Reason 0xA700; the SR was stored"
    harness.work()  # the retry sends both again, and fails the same way: dead after max_attempts = 2
    assert archive.requests == [both, both]
    assert outbox(harness) == [(db.FORWARD_DEAD, 2, 202)]

    archive.refuse.clear()
    config = write_config(harness.tmp / "node.toml", harness.config)
    done = peers.cli("forward", "--retry", "--json", config=config, check=False)
    assert done.returncode == 0, done.stderr
    [record] = [json.loads(line) for line in done.stdout.splitlines()]
    assert (record["kind"], record["state"], record["attempts"], record["status"]) == ("dicomweb", "sent", 1, 200)
    assert record["sr_sop_instance_uid"] == row.sop_instance_uid
    assert archive.requests == [both, both, both]
    assert outbox(harness) == [(db.FORWARD_SENT, 1, 200)]


def test_a_server_that_takes_no_secondary_captures_still_gets_the_sr_with_a_warning(
    node, archive: Archive, caplog
) -> None:
    harness = node()
    archive.refuse[SC] = stow.SOP_CLASS_NOT_SUPPORTED
    with caplog.at_level(logging.WARNING):
        harness.send([chest_dataset(seed=52)])
        harness.work()
    row = sr_row(harness)
    assert archive.requests == [[(SC, row.heatmap_sop_instance_uid), (SR, row.sop_instance_uid)]]
    assert outbox(harness) == [(db.FORWARD_SENT, 1, 202)]
    assert [r for r in caplog.records if "does not store Secondary Captures" in r.getMessage()]


def test_an_sr_the_server_fails_is_retried_whatever_became_of_its_heatmap_object(node, archive: Archive) -> None:
    harness = node(dicomweb={"max_attempts": 5})
    archive.refuse[SR] = 0xA700
    harness.send([chest_dataset(seed=53)])
    harness.work()
    assert outbox(harness) == [(db.FORWARD_PENDING, 1, 202)]
    assert last_error(harness) == "HTTP 202: failed, Failure Reason 0xA700"
    archive.refuse[SC] = stow.SOP_CLASS_NOT_SUPPORTED  # both refused: the SR's failure is the row's
    harness.work()
    assert outbox(harness) == [(db.FORWARD_PENDING, 2, 409)]
    assert last_error(harness) == "HTTP 409: failed, Failure Reason 0xA700"
    archive.refuse = {SC: 0xC000, SR: 0xA700}  # both failed, the heatmap object not for its class: named first
    harness.work()
    assert last_error(harness) == "heatmap object: HTTP 409: failed, Failure Reason 0xC000; the SR: " + (
        "HTTP 409: failed, Failure Reason 0xA700"
    )


def test_an_answer_that_does_not_list_the_heatmap_object_fails_the_row() -> None:
    item = dicomweb._Item(1, "/sr.dcm", "1.2.3.2", "/sc.dcm", "1.2.3.1")
    result = dicomweb._row_result(item, "archive", 202, {"1.2.3.2"}, {})
    assert not result.ok
    assert result.detail == "heatmap object: HTTP 202: the answer does not list heatmap object 1.2.3.1 as stored; " + (
        "the SR was stored"
    )
    assert dicomweb._row_result(item, "archive", 200, set(), {}).ok, "200: every part was stored"
    older = dicomweb._Item(2, "/sr.dcm", "1.2.3.2")
    assert dicomweb._row_result(older, "archive", 202, {"1.2.3.2"}, {}).ok


def test_without_a_heatmap_object_only_the_sr_goes(node, archive: Archive) -> None:
    harness = node(heatmap={"pacs_object": "none"})
    harness.send([chest_dataset(seed=54)])
    harness.work()
    row = sr_row(harness)
    assert row.heatmap_path is None
    assert archive.requests == [[(SR, row.sop_instance_uid)]]
    assert outbox(harness) == [(db.FORWARD_SENT, 1, 200)]


def test_an_unreadable_heatmap_object_fails_its_row_and_names_the_file(node, archive: Archive) -> None:
    harness = node(dicomweb={"max_attempts": 5})
    harness.send([chest_dataset(seed=55)])
    archive.refuse[SR] = 0xA700  # keeps the row pending for the second round
    harness.work()
    row = sr_row(harness)
    assert row.heatmap_path
    Path(row.heatmap_path).unlink()
    archive.refuse.clear()
    harness.work()
    assert outbox(harness) == [(db.FORWARD_PENDING, 2, None)]
    assert last_error(harness) == f"cannot read heatmap object file {row.heatmap_path}: No such file or directory"
    assert len(archive.requests) == 1, "nothing sent for a row whose file is missing"
