"""Hostile and broken peers against a running listener (``cxr-triage serve``, raw sockets on 127.0.0.1): announced
PDU lengths of 4 GiB before and after the association, a PDU cut off or left hanging, floods of idle connections,
the per-peer connection cap, garbage, a silent connection to the TLS port, a C-STORE whose Affected SOP Instance
UID is not the dataset's, and the memory a 200 MiB dataset costs. Memory is read from the listener's /proc (peak
RSS reset before each case). The guard logs one reason from one address once a minute: each case here gives a
reason of its own. Figures: docs/RELIABILITY.md, Hostile peers."""

from __future__ import annotations

import logging
import re
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import AE_TITLE, CALLING_AE, chest_dataset, config_values, echo, save_dataset, send, write_config
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import split_dataset

from cxr_triage.dicom import listener
from cxr_triage.ml.preprocess import CR_IMAGE_STORAGE
from cxr_triage.testing.peers import Server, echoscu, storescu, wait_until

pytestmark = pytest.mark.xdist_group("hostile_peers")  # one worker: one `serve` for the module

VERIFICATION = "1.2.840.10008.1.1"
MIB = 1 << 20
REQUEST_TIMEOUT = 2
NETWORK_TIMEOUT = 4
MAX_PDU = 262144
GROWTH_LIMIT_MB = 64
"""The most the listener's peak RSS may grow while a peer pushes 256 MiB it should refuse (kernel buffers and
allocator noise are a few MiB; unguarded, it grows by what was pushed)."""


# --- the running server --------------------------------------------------------------------------------------


@dataclass
class Running:
    server: Server
    port: int
    tmp: Path

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def status_mb(self, key: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    def reset_peak(self) -> float:
        """Reset the listener's peak RSS (VmHWM) to its RSS now, and return that."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self.status_mb("VmHWM")

    def log_mark(self) -> int:
        return len(self.server.log.read_bytes())

    def log_since(self, mark: int) -> list[str]:
        return self.server.log.read_bytes()[mark:].decode(errors="replace").splitlines()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("hostile")
    values = config_values(
        tmp,
        None,
        listener={
            "association_request_timeout": REQUEST_TIMEOUT,
            "network_timeout": NETWORK_TIMEOUT,
            "max_pdu": MAX_PDU,
            "max_associations": 8,
            "max_connections_per_peer": 100,  # every test peer is 127.0.0.1; the cap has its own test below
        },
        worker={"processes": 0},
    )
    config = write_config(tmp / "cxr.toml", values)
    with Server(config, int(values["listener"]["port"])) as server:
        yield Running(server, int(values["listener"]["port"]), tmp)


# --- raw DICOM upper layer -----------------------------------------------------------------------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(body)) + body


def association_request(called: str = AE_TITLE, calling: str = "HOSTILE", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification and CR Image Storage (PS3.8 9.3.2), as bytes."""
    contexts = b"".join(
        _item(0x20, bytes((cid, 0, 0, 0)) + _item(0x30, sop.encode()) + _item(0x40, ImplicitVRLittleEndian.encode()))
        for cid, sop in ((1, VERIFICATION), (3, CR_IMAGE_STORAGE))
    )
    user = _item(0x50, _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999"))
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + user
    return struct.pack(">BxL", 0x01, len(body)) + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU's type and body; (0, b"") when the connection ends first."""
    header = _read(sock, 6)
    if len(header) < 6:
        return 0, b""
    kind, length = struct.unpack(">BxL", header)
    return kind, _read(sock, length)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        try:
            more = sock.recv(size - len(data))
        except ConnectionResetError:
            break
        if not more:
            break
        data += more
    return data


def associated(port: int) -> socket.socket:
    """A raw connection with an accepted association (the listener's A-ASSOCIATE-AC read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(association_request())
    kind, _ = read_pdu(sock)
    assert kind == 0x02, f"expected an A-ASSOCIATE-AC, got PDU type {kind}"
    return sock


def wait_closed(sock: socket.socket, timeout: float) -> tuple[float, list[int]]:
    """Read until the listener ends the connection: the seconds that took and the PDU types it sent first."""
    sock.settimeout(timeout)
    started = time.monotonic()
    kinds = []
    while True:
        kind, _ = read_pdu(sock)
        if not kind:
            return time.monotonic() - started, kinds
        kinds.append(kind)


def push(sock: socket.socket, total: int, seconds: float = 20.0) -> int:
    """Send up to ``total`` zero bytes (until the peer stops taking them for 2 s); how many were taken."""
    sock.settimeout(2.0)
    chunk = bytes(MIB)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except OSError:  # closed by the listener (EPIPE, ECONNRESET) or not read any more (timeout)
            break
    return sent


def guard_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "cxr_triage.guard" in line]


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if " ERROR " in line]


# --- memory --------------------------------------------------------------------------------------------------


def test_a_4_gib_pdu_before_association_is_refused_at_once_with_bounded_memory(running: Running) -> None:
    mark = running.log_mark()
    before = running.reset_peak()
    socks = [socket.create_connection(("127.0.0.1", running.port), timeout=30) for _ in range(2)]
    for sock in socks:
        sock.sendall(b"\x01\x00\xff\xff\xff\xff")
    taken = [push(sock, 256 * MIB) for sock in socks]
    closed = [wait_closed(sock, 30) for sock in socks]
    growth = running.status_mb("VmHWM") - before
    for sock in socks:
        sock.close()
    assert all(seconds < 10 and kinds in ([], [0x07]) for seconds, kinds in closed), closed
    assert max(taken) < 64 * MIB, f"the listener kept reading: {[t // MIB for t in taken]} MiB taken"
    assert growth < GROWTH_LIMIT_MB, f"peak RSS grew by {growth:.0f} MiB"
    lines = guard_lines(running.log_since(mark))
    assert any("A-ASSOCIATE-RQ of 4294967295 bytes is over the limit" in line for line in lines), lines
    assert echo(running.port) == 0x0000


def test_a_p_data_over_the_negotiated_maximum_aborts_the_association(running: Running) -> None:
    mark = running.log_mark()
    before = running.reset_peak()
    sock = associated(running.port)
    sock.sendall(b"\x04\x00\xff\xff\xff\x00")
    taken = push(sock, 256 * MIB)
    seconds, kinds = wait_closed(sock, 30)
    growth = running.status_mb("VmHWM") - before
    sock.close()
    assert seconds < 10 and kinds in ([], [0x07]), (seconds, kinds)
    assert taken < 64 * MIB, f"the listener kept reading: {taken // MIB} MiB taken"
    assert growth < GROWTH_LIMIT_MB, f"peak RSS grew by {growth:.0f} MiB"
    lines = running.log_since(mark)
    assert any(f"over the negotiated maximum of {MAX_PDU}" in line for line in guard_lines(lines)), lines
    assert not errors(lines), errors(lines)
    assert echo(running.port) == 0x0000


def _big_file(path: Path, side: int) -> Path:
    """A CR whose 16-bit pixel data (side x side) is written in pieces, never held in memory whole."""
    ds = chest_dataset(64, 64)
    ds.Rows = ds.Columns = side
    del ds.PixelData
    save_dataset(ds, path)
    with path.open("ab") as fh:
        fh.write(struct.pack("<HH2sxxL", 0x7FE0, 0x0010, b"OW", side * side * 2))
        zeros = bytes(16 * MIB)
        left = side * side * 2
        while left:
            left -= fh.write(zeros[: min(left, len(zeros))])
    return path


def test_a_200_mib_dataset_costs_the_listener_about_its_size_once(running: Running, tmp_path: Path) -> None:
    big = _big_file(tmp_path / "big.dcm", 10240)
    size_mb = big.stat().st_size / MIB
    before = running.reset_peak()
    statuses = send(running.port, [big], contexts=[(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)], raw=True)
    growth = running.status_mb("VmHWM") - before
    big.unlink()
    for spooled in (running.tmp / "spool").rglob("*.dcm"):  # 200 MiB the later tests do not need
        if spooled.stat().st_size > 100 * MIB:
            spooled.unlink()
    assert statuses == [0x0000]
    assert growth < 1.5 * size_mb, f"a {size_mb:.0f} MiB dataset raised the peak RSS by {growth:.0f} MiB"


# --- stalls, cuts and floods ---------------------------------------------------------------------------------


def test_a_pdu_that_stops_halfway_is_dropped_after_the_network_timeout(running: Running) -> None:
    mark = running.log_mark()
    sock = associated(running.port)
    sock.sendall(b"\x04\x00\x00\x00\x03\xe8" + bytes(10))  # 1000 bytes announced, 10 sent, then silence
    seconds, kinds = wait_closed(sock, NETWORK_TIMEOUT + 30)
    sock.close()
    assert NETWORK_TIMEOUT - 0.5 <= seconds < NETWORK_TIMEOUT + 20, seconds
    assert kinds in ([], [0x07]), kinds
    lines = running.log_since(mark)
    assert any(f"no data for {NETWORK_TIMEOUT:g} s" in line for line in guard_lines(lines)), lines
    assert not errors(lines), errors(lines)


def test_a_peer_that_vanishes_inside_a_p_data_gives_one_line(running: Running) -> None:
    mark = running.log_mark()
    sock = associated(running.port)
    sock.sendall(b"\x04\x00\x00\x03\x0d\x40" + bytes(100_000))  # 200000 bytes announced, half sent
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    sock.close()
    wait_until(lambda: guard_lines(running.log_since(mark)), 30, "the listener to notice the cut connection")
    assert echo(running.port) == 0x0000
    lines = running.log_since(mark)
    about_it = [line for line in lines if "pynetdicom" in line and "INFO" not in line] + guard_lines(lines)
    assert len(about_it) == 1, about_it
    # The reset discards what the listener had not read yet: it got some of the 100000 bytes sent.
    assert re.search(r"127\.0\.0\.1:\d+ closed: .* inside a PDU \(\d+ of 200000 bytes\)", about_it[0]), about_it


def test_idle_connections_take_no_association_slot_and_are_dropped(running: Running, tmp_path: Path) -> None:
    mark = running.log_mark()
    idle = [socket.create_connection(("127.0.0.1", running.port), timeout=30) for _ in range(60)]
    # Two more that start a request and stall: a bare header, and half of an A-ASSOCIATE-RQ.
    stalled = [socket.create_connection(("127.0.0.1", running.port), timeout=30) for _ in range(2)]
    stalled[0].sendall(association_request()[:6])
    stalled[1].sendall(association_request()[:40])
    opened = time.monotonic()
    started = time.monotonic()
    assert echoscu(running.port, AE_TITLE), "dcmtk's echoscu was locked out by idle connections"
    cr = save_dataset(chest_dataset(seed=5), tmp_path / "cr.dcm")
    done = storescu(running.port, [cr])
    answered = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert answered < 15, f"the real senders took {answered:.1f} s"
    for sock in idle + stalled:
        wait_closed(sock, 30)
        sock.close()
    dropped_after = time.monotonic() - opened
    assert dropped_after < REQUEST_TIMEOUT + 20, dropped_after
    lines = running.log_since(mark)
    assert f"received SOP instance {pydicom.dcmread(cr).SOPInstanceUID}" in "\n".join(lines)
    assert 1 <= len(guard_lines(lines)) <= 3, guard_lines(lines)  # one per kind, the rest counted
    assert not errors(lines), errors(lines)


# --- garbage -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [b"", b"\x01\x00\x00\x00\x0f\xfa"], ids=["random", "plausible-header"])
def test_4_kib_of_garbage_gives_one_line(running: Running, start: bytes) -> None:
    mark = running.log_mark()
    garbage = start + np.random.default_rng(4).bytes(4096 - len(start))
    if not start:
        assert garbage[0] != 0x01
    sock = socket.create_connection(("127.0.0.1", running.port), timeout=30)
    sock.sendall(garbage)
    seconds, kinds = wait_closed(sock, 30)
    sock.close()
    assert seconds < 10 and kinds == [0x07], (seconds, kinds)
    wait_until(lambda: guard_lines(running.log_since(mark)), 30, "the guard's line")
    lines = running.log_since(mark)
    assert len(guard_lines(lines)) == 1, lines
    assert not errors(lines), errors(lines)
    assert echo(running.port) == 0x0000


# --- in-process listener -------------------------------------------------------------------------------------


def test_connections_per_peer_are_capped(make_harness, caplog) -> None:
    harness = make_harness(listener={"max_connections_per_peer": 3, "association_request_timeout": 30})
    held = [socket.create_connection(("127.0.0.1", harness.port), timeout=30) for _ in range(3)]
    wait_until(lambda: harness.listener.server.guard.open_connections("127.0.0.1") == 3, 20, "3 open connections")
    with caplog.at_level(logging.WARNING, logger="cxr_triage.guard"):
        extra = socket.create_connection(("127.0.0.1", harness.port), timeout=30)
        seconds, _ = wait_closed(extra, 20)
        extra.close()
        assert seconds < 10, "the connection over the cap was not closed at once"
        assert echo(harness.port) is None, "a fourth connection from the same address was let in"
    assert any("max_connections_per_peer = 3" in r.getMessage() for r in caplog.records)
    held[0].close()
    wait_until(lambda: echo(harness.port) == 0x0000, 20, "an association once below the cap")
    for sock in held[1:]:
        sock.close()


def _mismatched_file(path: Path) -> Path:
    """A CR file whose file meta (and so the sender's Affected SOP Instance UID) names another instance."""
    ds = chest_dataset(seed=11)
    body = save_dataset(ds, path.with_suffix(".src.dcm")).read_bytes()
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    _, offset = split_dataset(path.with_suffix(".src.dcm"))
    with path.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(body[offset:])
    return path


def test_affected_sop_instance_uid_mismatch_is_refused(harness, tmp_path: Path, caplog) -> None:
    path = _mismatched_file(tmp_path / "mismatch.dcm")
    with caplog.at_level(logging.INFO, logger="cxr_triage.listener"):
        statuses = send(harness.port, [path], contexts=[(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)], raw=True)
    assert statuses == [listener.STATUS_INSTANCE_MISMATCH] == [0xC212]
    said = [r for r in caplog.records if r.name == "cxr_triage.listener" and r.levelno >= logging.WARNING]
    assert len(said) == 1 and "the dataset's SOP Instance UID is" in said[0].getMessage(), said
    assert CALLING_AE in said[0].getMessage()
    assert harness.rows() == []


def test_a_silent_connection_to_the_tls_port_blocks_no_one(make_harness, tmp_path: Path) -> None:
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    harness = make_harness(
        listener={
            "tls_enabled": True,
            "tls_certificate": str(cert),
            "tls_private_key": str(key),
            "association_request_timeout": REQUEST_TIMEOUT,
        }
    )
    silent = socket.create_connection(("127.0.0.1", harness.port), timeout=30)  # never starts the handshake
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ae = AE(ae_title=CALLING_AE)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
        ae.add_requested_context(Verification)
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", harness.port, ae_title=AE_TITLE, tls_args=(client, "localhost"))
        assert assoc.is_established, "the TLS handshake of a silent peer held up the accept loop"
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert time.monotonic() - started < 10
        seconds, _ = wait_closed(silent, 30)
        assert seconds < REQUEST_TIMEOUT + 20, seconds
    finally:
        silent.close()  # else an accept loop stuck in its handshake would never stop
