"""Tests of the C-STORE sender: real peers (dcmtk storescp, pynetdicom SCPs), failures as results, retry delays.

dcmtk's storescp binds every interface, so its scenario runs in a private network namespace: this file is also a
script (``python tests/test_scu.py <scenario> <workdir>``) that the tests start under ``peers.netns_command``.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import write_sr
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage

from cxr_triage.core.endpoints import Destination, client_tls_context
from cxr_triage.dicom.scu import SendResult, send_datasets
from cxr_triage.outputs.delivery import retry_delay
from cxr_triage.outputs.sr import build_triage_sr, summarize_triage_sr
from cxr_triage.testing.peers import Storescp, dcmtk_tool, free_port, netns_command, terminate, wait_until

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
SHA = "00112233445566778899aabbccddeeff" * 2
CALLING = "CXR_TRIAGE"


def make_sr(label: str = "covid", previous: Dataset | None = None) -> Dataset:
    evidence = pydicom.dcmread(SHARED_DICOM / "pydicom-data_RG1_UNCR.dcm", stop_before_pixels=True)
    probabilities = {"covid": 0.2, "normal": 0.3, "pneumonia": 0.5}
    probabilities[label], probabilities["pneumonia"] = probabilities["pneumonia"], probabilities[label]
    return build_triage_sr(
        evidence,
        label=label,
        probabilities=probabilities,
        model_version="scu-test",
        model_sha256=SHA,
        flagged=label != "normal",
        previous_sr=previous,
    )


# --------------------------------------------------------------------------------------------- scenario (netns)


def _scenario_storescp(workdir: Path) -> None:
    """Send two reports to a real storescp and one to a storescp that refuses every association."""
    datasets = [pydicom.dcmread(path) for path in sorted(workdir.glob("in-*.dcm"))]
    report: dict[str, Any] = {}
    port, refuse_port = free_port(), free_port()
    with Storescp(workdir / "received", port, ae_title="STORESCP"):
        results = send_datasets(datasets, Destination("STORESCP", "127.0.0.1", port), CALLING, timeout=20)
        report["accepted"] = [dataclasses.asdict(r) for r in results]
    argv = [dcmtk_tool("storescp"), "-d", "--refuse", "-od", str(workdir), str(refuse_port)]
    with (workdir / "storescp-refuse.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Not peers.wait_for_port: its probe connection races with the next association in storescp --refuse
        # ("Association Reject Failed ... state 1 event 7"), so the listening socket is looked up in /proc instead.
        wait_until(lambda: proc.poll() is None and _listening(refuse_port), 20, "storescp --refuse to listen")
        results = send_datasets(datasets[:1], Destination("STORESCP", "127.0.0.1", refuse_port), CALLING, timeout=20)
        report["refused"] = [dataclasses.asdict(r) for r in results]
    finally:
        terminate(proc, timeout=5)
    (workdir / "report.json").write_text(json.dumps(report))


def _listening(port: int) -> bool:
    """True when a socket of this network namespace listens on ``port`` (from /proc/net, without connecting)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


SCENARIOS: dict[str, Callable[[Path], None]] = {"storescp": _scenario_storescp}


def run_scenario(name: str, workdir: Path) -> dict[str, Any]:
    argv = netns_command([sys.executable, str(Path(__file__).resolve()), name, str(workdir)])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((workdir / "report.json").read_text())


# --------------------------------------------------------------------------------------------- in-process SCPs


@contextmanager
def pynetdicom_scp(
    handler: Callable[[evt.Event], int] | None = None,
    ae_title: str = "RIGHT",
    require_called_aet: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[tuple[int, list[Dataset], list[int]]]:
    """A pynetdicom storage SCP on 127.0.0.1 (only), over TLS with ``ssl_context``: yields (port, received
    datasets, associations seen)."""
    received: list[Dataset] = []
    associations: list[int] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        if handler is not None:
            return handler(event)
        with lock:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            received.append(dataset)
        return 0x0000

    def on_accepted(event: evt.Event) -> None:
        with lock:
            associations.append(id(event.assoc))

    ae = AE(ae_title=ae_title)
    ae.require_called_aet = require_called_aet
    ae.add_supported_context(ComprehensiveSRStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_accepted)],
        ssl_context=ssl_context,
    )
    try:
        yield server.server_address[1], received, associations
    finally:
        server.shutdown()


# --------------------------------------------------------------------------------------------- tests


def test_send_to_dcmtk_storescp(tmp_path: Path) -> None:
    first = make_sr("covid")
    second = make_sr("normal", previous=first)
    write_sr(first, tmp_path / "in-1.dcm")
    write_sr(second, tmp_path / "in-2.dcm")

    report = run_scenario("storescp", tmp_path)

    logs = {path.name: path.read_text(errors="replace")[-2000:] for path in tmp_path.glob("storescp*.log")}
    assert [r["status"] for r in report["accepted"]] == [0, 0], (report, logs)
    assert [r["ok"] for r in report["accepted"]] == [True, True]
    received = {}
    for path in (tmp_path / "received").iterdir():
        dataset = pydicom.dcmread(path)
        received[dataset.SOPInstanceUID] = dataset
    assert set(received) == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert summarize_triage_sr(received[first.SOPInstanceUID]).label == "covid"
    assert summarize_triage_sr(received[second.SOPInstanceUID]).predecessor_sop_instance_uids == (first.SOPInstanceUID,)

    (refused,) = report["refused"]
    assert refused["ok"] is False
    assert refused["status"] is None
    # storescp --refuse now and then drops the connection instead of sending its A-ASSOCIATE-RJ (its log then says
    # "Association Reject Failed ... state 1 event 7"); the sender must report either as a failure, never raise.
    # The rejection path itself is pinned down by test_wrong_called_ae_title_is_rejected.
    assert refused["detail"].startswith(("association rejected", "association aborted")), (report, logs)


def test_one_association_for_all_datasets() -> None:
    datasets = [make_sr("covid"), make_sr("pneumonia"), make_sr("normal")]
    with pynetdicom_scp() as (port, received, associations):
        results = send_datasets(datasets, Destination("RIGHT", "127.0.0.1", port), CALLING, timeout=10)
    assert results == [SendResult(True, 0, "success")] * 3
    assert [d.SOPInstanceUID for d in received] == [d.SOPInstanceUID for d in datasets]
    assert len(associations) == 1
    assert received[0].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_wrong_called_ae_title_is_rejected() -> None:
    with pynetdicom_scp(ae_title="RIGHT", require_called_aet=True) as (port, received, _):
        results = send_datasets([make_sr()], Destination("WRONG", "127.0.0.1", port), CALLING, timeout=10)
    (result,) = results
    assert result.ok is False
    assert result.status is None
    assert "association rejected" in result.detail
    assert "Called AE title not recognised" in result.detail
    assert received == []


def test_refused_connection_is_a_failed_result() -> None:
    port = free_port()  # nothing listens there
    results = send_datasets([make_sr(), make_sr()], Destination("ANY", "127.0.0.1", port), CALLING, timeout=5)
    assert [r.ok for r in results] == [False, False]
    assert all(r.status is None for r in results)
    assert "connection refused" in results[0].detail
    assert str(port) in results[0].detail


def test_unresolvable_host_is_a_failed_result() -> None:
    (result,) = send_datasets([make_sr()], Destination("ANY", "no-such-host.invalid", 104), CALLING, timeout=5)
    assert result.ok is False
    assert "cannot resolve host name" in result.detail


def test_silent_peer_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts TCP connections (backlog) but never answers the association request
        port = listener.getsockname()[1]
        (result,) = send_datasets([make_sr()], Destination("ANY", "127.0.0.1", port), CALLING, timeout=1)
    assert result.ok is False
    assert result.status is None
    assert "timed out after 1 s" in result.detail


def test_slow_store_response_times_out() -> None:
    def slow(event: evt.Event) -> int:
        time.sleep(2.5)
        return 0x0000

    with pynetdicom_scp(handler=slow) as (port, _, _):
        (result,) = send_datasets([make_sr()], Destination("RIGHT", "127.0.0.1", port), CALLING, timeout=1)
    assert result.ok is False
    assert "no C-STORE response" in result.detail


def test_dimse_failure_status_is_reported() -> None:
    with pynetdicom_scp(handler=lambda event: 0xA700) as (port, _, _):
        (result,) = send_datasets([make_sr()], Destination("RIGHT", "127.0.0.1", port), CALLING, timeout=10)
    assert result == SendResult(False, 0xA700, "C-STORE failed with status 0xA700")


def test_warning_status_counts_as_stored() -> None:
    with pynetdicom_scp(handler=lambda event: 0xB000) as (port, _, _):
        (result,) = send_datasets([make_sr()], Destination("RIGHT", "127.0.0.1", port), CALLING, timeout=10)
    assert result.ok is True
    assert result.status == 0xB000


def test_abort_during_store_fails_the_rest() -> None:
    def abort(event: evt.Event) -> int:
        event.assoc.abort()
        return 0x0000

    with pynetdicom_scp(handler=abort) as (port, _, _):
        results = send_datasets([make_sr(), make_sr()], Destination("RIGHT", "127.0.0.1", port), CALLING, timeout=2)
    assert [r.ok for r in results] == [False, False]
    assert "no C-STORE response" in results[0].detail
    # Depending on when the abort lands, the second request is not sent or gets no answer.
    assert "ended before" in results[1].detail or "no C-STORE response" in results[1].detail


def test_dataset_without_uids_fails_alone() -> None:
    broken = Dataset()
    broken.PatientID = "X"
    good = make_sr()
    with pynetdicom_scp() as (port, received, _):
        results = send_datasets([broken, good], Destination("RIGHT", "127.0.0.1", port), CALLING, timeout=10)
    assert results[0].ok is False
    assert "SOP Instance UID" in results[0].detail
    assert results[1] == SendResult(True, 0, "success")
    assert [d.SOPInstanceUID for d in received] == [good.SOPInstanceUID]


def test_dataset_without_file_meta_is_sent_as_explicit_vr() -> None:
    sr = make_sr()
    in_memory = Dataset()
    in_memory.update(sr)  # the same elements, no file meta information
    with pynetdicom_scp() as (port, received, _):
        (result,) = send_datasets([in_memory], Destination("RIGHT", "127.0.0.1", port), CALLING, timeout=10)
    assert result == SendResult(True, 0, "success")
    assert received[0].SOPInstanceUID == sr.SOPInstanceUID
    assert received[0].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert not hasattr(in_memory, "file_meta") or "TransferSyntaxUID" not in in_memory.file_meta


def test_empty_batch_and_bad_arguments() -> None:
    destination = Destination("RIGHT", "127.0.0.1", 104)
    assert send_datasets([], destination, CALLING) == []
    with pytest.raises(ValueError, match="calling AE title"):
        send_datasets([make_sr()], destination, "WAY_TOO_LONG_AE_TITLE")
    with pytest.raises(ValueError, match="timeout"):
        send_datasets([make_sr()], destination, CALLING, timeout=0)


@pytest.mark.parametrize(
    ("ae_title", "host", "port"),
    [
        ("", "127.0.0.1", 104),
        ("   ", "127.0.0.1", 104),
        ("A" * 17, "127.0.0.1", 104),
        ("BACK\\SLASH", "127.0.0.1", 104),
        ("TAB\tAE", "127.0.0.1", 104),
        ("ÉCHO", "127.0.0.1", 104),
        (104, "127.0.0.1", 104),
        ("PACS", "", 104),
        ("PACS", "two words", 104),
        ("PACS", "127.0.0.1", 0),
        ("PACS", "127.0.0.1", 65536),
        ("PACS", "127.0.0.1", True),
        ("PACS", "127.0.0.1", "104"),
    ],
)
def test_destination_rejects_invalid_values(ae_title: Any, host: Any, port: Any) -> None:
    with pytest.raises(ValueError):
        Destination(ae_title, host, port)


def test_destination_valid_and_from_mapping() -> None:
    destination = Destination("PACS ", "pacs.example.org", 11112)
    assert destination.ae_title == "PACS"
    assert str(destination) == "PACS@pacs.example.org:11112"
    assert Destination("A" * 16, "::1", 65535).port == 65535
    with pytest.raises(dataclasses.FrozenInstanceError):
        destination.port = 1  # type: ignore[misc]

    assert Destination.from_mapping({"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}) == Destination(
        "PACS", "127.0.0.1", 4242
    )
    assert Destination.from_mapping({"ae_title": "PACS", "host": "127.0.0.1", "port": "4242"}).port == 4242
    with pytest.raises(ValueError, match="missing keys \\['port'\\]"):
        Destination.from_mapping({"ae_title": "PACS", "host": "127.0.0.1"})
    with pytest.raises(ValueError, match="unknown keys \\['aet'\\]"):
        Destination.from_mapping({"ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "aet": "X"})
    with pytest.raises(ValueError):
        Destination.from_mapping(["PACS", "127.0.0.1", 4242])  # type: ignore[arg-type]


def test_retry_delay_doubles_and_is_capped() -> None:
    assert [retry_delay(attempt, 30, 3600) for attempt in range(1, 9)] == [
        30.0,
        60.0,
        120.0,
        240.0,
        480.0,
        960.0,
        1920.0,
        3600.0,
    ]
    assert retry_delay(1, 0.5, 10) == 0.5
    assert retry_delay(10**6, 30, 3600) == 3600.0
    assert retry_delay(3, 30, 10) == 10.0
    for attempt in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            retry_delay(attempt, 30, 3600)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        retry_delay(1, -1, 3600)


if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]))


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A throw-away self-signed certificate for 127.0.0.1 / localhost: (certificate, private key)."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def server_tls(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=cert, keyfile=key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def test_tls_destination_is_verified_against_the_configured_trust_anchors(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "pacs")
    with pynetdicom_scp(ssl_context=server_tls(cert, key)) as (port, received, _):
        secure = Destination("RIGHT", "127.0.0.1", port, tls=True)
        trusted = client_tls_context(ca_file=str(cert))
        assert send_datasets([make_sr()], secure, CALLING, timeout=10, tls_context=trusted) == [
            SendResult(True, 0, "success")
        ]
        (untrusted,) = send_datasets([make_sr()], secure, CALLING, timeout=10)  # the system's trust store
        (plain,) = send_datasets([make_sr()], Destination("RIGHT", "127.0.0.1", port), CALLING, timeout=5)
    assert len(received) == 1
    assert untrusted.ok is False and untrusted.status is None
    assert "TLS handshake failed" in untrusted.detail and "certificate" in untrusted.detail, untrusted.detail
    assert plain.ok is False and plain.status is None, "plain DICOM to a TLS port fails as a result"


def test_tls_destination_that_requires_client_certificates(tmp_path: Path) -> None:
    server_cert, server_key = self_signed(tmp_path, "pacs")
    client_cert, client_key = self_signed(tmp_path, "cxr")
    context = server_tls(server_cert, server_key, client_ca=client_cert)
    with pynetdicom_scp(ssl_context=context) as (port, received, _):
        secure = Destination("RIGHT", "127.0.0.1", port, tls=True)
        anonymous = client_tls_context(ca_file=str(server_cert))
        (refused,) = send_datasets([make_sr()], secure, CALLING, timeout=5, tls_context=anonymous)
        mutual = client_tls_context(str(server_cert), str(client_cert), str(client_key))
        (accepted,) = send_datasets([make_sr()], secure, CALLING, timeout=10, tls_context=mutual)
    assert refused.ok is False
    assert accepted == SendResult(True, 0, "success")
    assert len(received) == 1


def test_tls_settings_are_validated() -> None:
    assert Destination.from_mapping({"ae_title": "PACS", "host": "h", "port": 2762, "tls": True}).tls is True
    assert Destination.from_mapping({"ae_title": "PACS", "host": "h", "port": 104}).tls is False
    assert str(Destination("PACS", "h", 2762, tls=True)) == "PACS@h:2762", "forwards name it the same way"
    with pytest.raises(ValueError, match="tls must be true or false"):
        Destination.from_mapping({"ae_title": "PACS", "host": "h", "port": 2762, "tls": "yes"})
    with pytest.raises(ValueError, match="needs its certificate"):
        client_tls_context(private_key="/etc/key.pem")
    with pytest.raises(OSError):
        client_tls_context(ca_file="/nonexistent/ca.pem")
