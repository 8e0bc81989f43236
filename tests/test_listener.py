"""The listener: C-ECHO, C-STORE of CR/DX/SC in every decodable transfer syntax (pynetdicom and dcmtk senders),
precise failure statuses, refusals recorded by the worker, duplicates and conflicts, the spool reserve and the
calling-AE allow-list. Every accepted instance must end with a result row."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import CALLING_AE, SHARED_DICOM, chest_dataset, dcmtk, echo, save_dataset, send
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom.dsutils import split_dataset
from sqlalchemy import func, select

from cxr_triage.core import db
from cxr_triage.dicom import listener
from cxr_triage.ml.preprocess import CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _dcmtk_convert(tool: str, options: list[str], source: Dataset, tmp: Path, name: str) -> Path:
    src = save_dataset(source, tmp / f"{name}.src.dcm")
    out = tmp / f"{name}.dcm"
    subprocess.run([dcmtk(tool), *options, str(src), str(out)], check=True, capture_output=True, timeout=60)
    return out


def encoded_variants(tmp: Path) -> dict[str, Path]:
    """One small chest image per transfer syntax the listener must take, written by real encoders."""
    tmp.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["explicit"] = save_dataset(chest_dataset(seed=1), tmp / "explicit.dcm")
    implicit = chest_dataset(seed=2)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    files["implicit"] = save_dataset(implicit, tmp / "implicit.dcm")
    files["deflate"] = _dcmtk_convert("dcmconv", ["+td"], chest_dataset(seed=3), tmp, "deflate")
    rle = chest_dataset(seed=4)
    rle.compress(RLELossless)
    files["rle"] = save_dataset(rle, tmp / "rle.dcm")
    j2kr = chest_dataset(seed=5)
    j2kr.compress(JPEG2000Lossless)
    files["j2k_lossless"] = save_dataset(j2kr, tmp / "j2kr.dcm")
    j2ki = chest_dataset(seed=6)
    j2ki.compress(JPEG2000, j2k_cr=[10])
    files["j2k_lossy"] = save_dataset(j2ki, tmp / "j2ki.dcm")
    eight_bit = chest_dataset(seed=7)
    pixels = (eight_bit.pixel_array >> 4).astype(np.uint8)
    eight_bit.BitsAllocated, eight_bit.BitsStored, eight_bit.HighBit = 8, 8, 7
    eight_bit.PixelData = pixels.tobytes()
    files["jpeg_baseline"] = _dcmtk_convert("dcmcjpeg", ["+eb"], eight_bit, tmp, "jpeg_baseline")
    files["jpeg_extended"] = _dcmtk_convert("dcmcjpeg", ["+ee"], chest_dataset(seed=8), tmp, "jpeg_extended")
    files["jpeg_lossless"] = _dcmtk_convert("dcmcjpeg", ["+el"], chest_dataset(seed=9), tmp, "jpeg_lossless")
    files["jpeg_lossless_sv1"] = _dcmtk_convert("dcmcjpeg", ["+e1"], chest_dataset(seed=10), tmp, "jpeg_sv1")
    files["jpegls_lossless"] = _dcmtk_convert("dcmcjpls", ["+el"], chest_dataset(seed=11), tmp, "jls")
    files["jpegls_near"] = _dcmtk_convert("dcmcjpls", ["+en"], chest_dataset(seed=12), tmp, "jls_near")
    dx = chest_dataset(
        seed=13, SOPClassUID=DX_FOR_PRESENTATION, Modality="DX", PresentationIntentType="FOR PRESENTATION"
    )
    files["dx"] = save_dataset(dx, tmp / "dx.dcm")
    sc = chest_dataset(seed=14, SOPClassUID=SECONDARY_CAPTURE, Modality="DX")
    files["secondary_capture"] = save_dataset(sc, tmp / "sc.dcm")
    return files


EXPECTED_SYNTAX = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k_lossless": JPEG2000Lossless,
    "j2k_lossy": JPEG2000,
    "jpeg_baseline": JPEGBaseline8Bit,
    "jpeg_extended": JPEGExtended12Bit,
    "jpeg_lossless": JPEGLossless,
    "jpeg_lossless_sv1": JPEGLosslessSV1,
    "jpegls_lossless": JPEGLSLossless,
    "jpegls_near": JPEGLSNearLossless,
    "dx": ExplicitVRLittleEndian,
    "secondary_capture": ExplicitVRLittleEndian,
}


def test_c_echo_with_pynetdicom_and_dcmtk(harness) -> None:
    from cxr_triage.testing.peers import echoscu

    assert echo(harness.port) == 0x0000
    assert echoscu(harness.port, "CXR_TRIAGE")


def test_every_transfer_syntax_is_received_as_sent_and_classified(harness, tmp_path: Path) -> None:
    files = encoded_variants(tmp_path / "variants")
    for name, path in files.items():
        assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == EXPECTED_SYNTAX[name]
    statuses = harness.send(list(files.values()))
    assert statuses == [0x0000] * len(files)
    # Received as sent: the spool holds the sender's bytes in the sender's transfer syntax.
    with harness.sessions() as session:
        recorded = {i.sop_instance_uid: i for i in session.scalars(select(db.Instance)).all()}
    for name, path in files.items():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert recorded[uid].transfer_syntax_uid == EXPECTED_SYNTAX[name], name
        assert recorded[uid].calling_ae == CALLING_AE
        assert Path(recorded[uid].spool_path).is_file()
        assert recorded[uid].status == db.QUEUED
    assert harness.work() == len(files)
    rows = harness.rows()
    assert len(rows) == len(files)
    for row in rows:
        assert row["status"] == "ok", row
        assert row["label"] in ("covid", "normal", "pneumonia")
        assert set(row["probabilities"]) == {"covid", "normal", "pneumonia"}
        assert row["model_version"] == "tiny-test"
        assert row["sr_sop_instance_uid"]


def test_shared_files_with_dcmtk_storescu(harness) -> None:
    from cxr_triage.testing.peers import storescu

    files = sorted(SHARED_DICOM.glob("*.dcm"))
    assert len(files) == 5
    by_syntax: dict[str, list[Path]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        syntax = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)
        by_syntax.setdefault({JPEG2000Lossless: "-xv", JPEG2000: "-xw"}.get(syntax, "-x="), []).append(path)
    for option, group in by_syntax.items():
        storescu(harness.port, group, extra=["-R", option])
    harness.work()
    rows = harness.rows()
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID) for p in files}
    # The two JPEG 2000 files are the same image as RG1_UNCR but distinct instances: all five arrive.
    assert {row["sop_instance_uid"] for row in rows} == expected
    for row in rows:
        assert row["status"] == "ok", row
        assert row["probabilities"] is not None


def _raw_file(path: Path, sop_class: str, body: bytes) -> Path:
    """A Part 10 file with valid file meta and ``body`` as its data set (sent without decoding by pynetdicom)."""
    from pydicom.filewriter import write_file_meta_info

    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    with path.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(body)
    return path


@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR:UserWarning")  # the garbage input
def test_bad_input_gets_a_recorded_reason_or_precise_status(harness, tmp_path: Path) -> None:
    # One scenario read top to bottom, each step depending on the last: split, it would read worse.
    from cxr_triage.ml.preprocess import CR_IMAGE_STORAGE

    refused: dict[str, tuple[Dataset, str]] = {}
    refused["lateral"] = (chest_dataset(ViewPosition="LL"), "ViewPosition")
    refused["not_chest"] = (chest_dataset(BodyPartExamined="HAND"), "BodyPartExamined")
    refused["ct_modality"] = (chest_dataset(Modality="CT"), "Modality")
    rgb = chest_dataset(PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    rgb.PixelData = rgb.PixelData * 3
    refused["rgb"] = (rgb, "PhotometricInterpretation")
    multi = chest_dataset(NumberOfFrames=2)
    multi.PixelData = multi.PixelData * 2
    refused["multiframe"] = (multi, "NumberOfFrames")
    truncated = chest_dataset()
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]
    refused["truncated_pixels"] = (truncated, "PixelData")
    refused["no_pixels"] = (chest_dataset(PixelData=None), "PixelData")
    processing = chest_dataset(SOPClassUID=DX_FOR_PROCESSING, Modality="DX", PresentationIntentType="FOR PROCESSING")
    refused["dx_for_processing"] = (processing, "SOPClassUID")
    statuses = harness.send([ds for ds, _ in refused.values()])
    assert statuses == [0x0000] * len(refused), "refused-for-content instances are stored and answered success"

    whole = save_dataset(chest_dataset(seed=99), tmp_path / "whole.dcm").read_bytes()
    failures = {
        "garbage": (
            _raw_file(tmp_path / "garbage.dcm", CR_IMAGE_STORAGE, np.random.default_rng(0).bytes(3000)),
            0xC210,
        ),
        # Cut inside Pixel Data: the header parses, so it is stored and the worker refuses it as truncated.
        "cut_in_pixel_data": (tmp_path / "cut.dcm", 0x0000),
        "sop_class_mismatch": (save_dataset(chest_dataset(SOPClassUID=CT_IMAGE_STORAGE), tmp_path / "ct.dcm"), 0xA900),
        "no_study_uid": (save_dataset(chest_dataset(StudyInstanceUID=None), tmp_path / "nostudy.dcm"), 0xC211),
    }
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) - 3000])
    # The mismatched file claims CR in its file meta, so it travels on the CR context.
    ct_path = failures["sop_class_mismatch"][0]
    _, offset = split_dataset(ct_path)
    _raw_file(ct_path, CR_IMAGE_STORAGE, ct_path.read_bytes()[offset:])
    contexts = [(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)]
    for name, (path, expected) in failures.items():
        status = send(harness.port, [path], contexts=contexts, raw=True)[0]
        if expected == 0xC210:  # unparseable: any "cannot understand" status, whichever check catches it first
            assert status is not None and 0xC000 <= status <= 0xCFFF, (name, hex(status or 0))
        else:
            assert status == expected, (name, hex(status or 0))
    # A CT Image Storage context is not accepted at all.
    ct = chest_dataset(SOPClassUID=CT_IMAGE_STORAGE, Modality="CT")
    with pytest.raises(ValueError, match="No presentation context"):
        send(harness.port, [ct], contexts=[(CT_IMAGE_STORAGE, ExplicitVRLittleEndian), *contexts])
    assert echo(harness.port) == 0x0000, "the listener survived every bad input"

    harness.work()
    rows = {row["sop_instance_uid"]: row for row in harness.rows()}
    cut_uid = str(pydicom.dcmread(tmp_path / "whole.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert rows.pop(cut_uid)["reason"].startswith("PixelData"), "the cut file is refused as truncated"
    assert len(rows) == len(refused)
    for name, (ds, attribute) in refused.items():
        row = rows[str(ds.SOPInstanceUID)]
        assert row["status"] == "rejected", name
        assert attribute in row["reason"], (name, row["reason"])
        assert row["probabilities"] is None and row["label"] is None
    with harness.sessions() as session:
        assert session.scalar(select(func.count()).select_from(db.PredictionRecord)) == 0
        codes = {r.code for r in session.scalars(select(db.RefusalRecord)).all()}
    assert {"not_frontal", "not_chest", "modality", "colour", "multiframe", "no_pixels", "for_processing"} <= codes


def test_large_pixel_data_is_spooled_byte_for_byte_without_being_parsed(harness, tmp_path: Path) -> None:
    # Pixel data over listener.HEADER_DEFER_BYTES is never decoded by the listener: the spool must still hold the
    # dataset exactly as sent, and a cut one is stored and refused by the worker, as a small one is.
    big = save_dataset(chest_dataset(512, 512, seed=7), tmp_path / "big.dcm")
    assert big.stat().st_size > 4 * listener.HEADER_DEFER_BYTES
    whole = save_dataset(chest_dataset(512, 512, seed=8), tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) - 100_000])
    contexts = [(CR_IMAGE_STORAGE, ExplicitVRLittleEndian)]
    assert send(harness.port, [big, cut], contexts=contexts, raw=True) == [0x0000, 0x0000]
    with harness.sessions() as session:
        spooled = {i.sop_instance_uid: Path(i.spool_path) for i in session.scalars(select(db.Instance)).all()}
    big_uid = str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    _, sent_offset = split_dataset(big)
    _, spooled_offset = split_dataset(spooled[big_uid])
    assert spooled[big_uid].read_bytes()[spooled_offset:] == big.read_bytes()[sent_offset:]
    assert harness.work() == 2
    rows = {row["sop_instance_uid"]: row for row in harness.rows()}
    assert rows[big_uid]["status"] == "ok"
    cut_uid = str(pydicom.dcmread(tmp_path / "whole.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert rows[cut_uid]["reason"].startswith("PixelData"), rows[cut_uid]


def test_duplicate_is_a_no_op_and_different_bytes_are_a_conflict(harness) -> None:
    ds = chest_dataset(seed=21)
    assert harness.send([ds, ds]) == [0, 0]
    assert len(harness.rows()) == 1
    changed = pydicom.dcmread(save_dataset(ds, harness.tmp / "changed.dcm"))
    changed.InstanceNumber = 7
    assert harness.send([changed]) == [0]
    rows = harness.rows()
    assert [r["sop_instance_uid"] for r in rows] == [str(ds.SOPInstanceUID)] * 2
    with harness.sessions() as session:
        conflicts = session.scalars(select(db.Conflict)).all()
        instances = session.scalars(select(db.Instance).order_by(db.Instance.id)).all()
    assert len(conflicts) == 1
    assert conflicts[0].existing_instance_id == instances[0].id
    assert conflicts[0].new_instance_id == instances[1].id
    assert instances[0].sha256 != instances[1].sha256
    assert instances[0].spool_path != instances[1].spool_path
    assert harness.send([changed]) == [0], "the second version sent again is also a no-op"
    harness.work()
    assert [r["status"] for r in harness.rows()] == ["ok", "ok"]


def test_spool_below_reserve_answers_out_of_resources(make_harness) -> None:
    harness = make_harness(storage={"min_free_mb": 1 << 40})
    assert harness.send([chest_dataset()]) == [0xA700]
    assert harness.rows() == []
    assert not any(Path(harness.config["storage"]["spool_dir"]).rglob("*.dcm"))


def test_unknown_calling_ae_is_rejected(make_harness, caplog) -> None:
    harness = make_harness(listener={"allowed_calling_aes": ["PACS"]})
    with caplog.at_level(logging.WARNING, logger="cxr_triage.listener"):
        assert echo(harness.port, calling_ae="INTRUDER") is None
    assert any(
        "'INTRUDER'" in r.getMessage() and "rejected: calling AE title not on the allow-list" in r.getMessage()
        for r in caplog.records
    ), "the log says why"
    with pytest.raises(AssertionError, match="not established"):
        harness.send([chest_dataset()], calling_ae="INTRUDER")
    assert harness.send([chest_dataset()], calling_ae="PACS") == [0]
    assert len(harness.rows()) == 1


def test_wrong_called_ae_is_rejected(harness, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="cxr_triage.listener"):
        assert echo(harness.port, called_ae="SOMEONE_ELSE") is None
    reason = "rejected: called AE title 'SOMEONE_ELSE' is not this listener's"
    assert any(reason in r.getMessage() for r in caplog.records)


def test_transfer_syntaxes_offered_include_every_decodable_one() -> None:
    offered = set(listener.decodable_transfer_syntaxes())
    assert set(EXPECTED_SYNTAX.values()) <= offered


def test_tls_listener(make_harness, tmp_path: Path) -> None:
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
    harness = make_harness(listener={"tls_enabled": True, "tls_certificate": str(cert), "tls_private_key": str(key)})
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", harness.port, ae_title="CXR_TRIAGE", tls_args=(client, "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert echo(harness.port) is None, "plain DICOM is not accepted on a TLS port"


def test_stop_drops_idle_connections_and_lets_a_store_in_progress_finish(make_harness) -> None:
    import socket
    import threading
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    harness = make_harness(listener={"acse_timeout": 30, "network_timeout": 60})
    running = harness.listener
    # A health check's bare TCP connection that never sends a request, and an association left idle.
    bare = socket.create_connection(("127.0.0.1", harness.port))
    bare.settimeout(20)
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(Verification)
    idle = ae.associate("127.0.0.1", harness.port, ae_title="CXR_TRIAGE")
    assert idle.is_established
    # A C-STORE whose handling is still going on when the stop begins.
    handling = threading.Event()
    store = running.receiver.store

    def slow_store(item, data):  # type: ignore[no-untyped-def]
        handling.set()
        time.sleep(1.0)
        return store(item, data)

    running.receiver.store = slow_store
    statuses: list[int | None] = []
    sender = threading.Thread(target=lambda: statuses.extend(harness.send([chest_dataset(seed=3)])))
    sender.start()
    assert handling.wait(20)
    started = time.monotonic()
    harness.stop()
    stopped_after = time.monotonic() - started
    sender.join(20)
    assert stopped_after < 10, f"stop took {stopped_after:.1f} s: idle connections were waited for"
    assert bare.recv(1) == b"", "the bare connection was closed"
    assert statuses == [0x0000], "the C-STORE in progress was answered"
    idle.release()
    assert idle.is_aborted or not idle.is_established
    engine = db.make_engine(harness.config["database"]["url"])
    try:
        with db.read_session(engine) as session:
            assert session.scalar(select(func.count()).select_from(db.Instance)) == 1
    finally:
        engine.dispose()
