"""``cxr-triage send``: every shared DICOM file reaches the listener in its own transfer syntax, failures are named."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from conftest import chest_dataset, free_port, save_dataset
from sqlalchemy import select

from cxr_triage import cli
from cxr_triage.core import db

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"


def _send(*argv: str) -> int:
    return cli.main(["send", *argv])


def test_send_stores_the_five_shared_files_as_they_are(harness, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(SHARED_DICOM.glob("*.dcm"))
    assert len(files) == 5
    assert _send(str(SHARED_DICOM), "--port", str(harness.port)) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if not line.startswith(str(SHARED_DICOM / "catalog.csv"))]
    assert len(lines) == 5 and all(line.endswith("stored (0x0000)") for line in lines), out
    assert "catalog.csv\t-\tskipped: not DICOM" in out
    assert "5 stored, 0 not stored" in err
    with harness.sessions() as session:
        stored = {Path(p).name: p for p in session.scalars(select(db.Instance.spool_path))}
    assert len(stored) == 5
    for original in files:
        sent = pydicom.dcmread(original, force=True)
        received = pydicom.dcmread(next(p for p in stored.values() if sent.SOPInstanceUID in p), force=True)
        assert received.SOPInstanceUID == sent.SOPInstanceUID
        own = sent.file_meta.get("TransferSyntaxUID") if "TransferSyntaxUID" in sent.get("file_meta", {}) else None
        if own is not None and own.is_compressed:  # JPEG 2000 arrives as it was stored, not decompressed
            assert received.file_meta.TransferSyntaxUID == own
            assert received.PixelData == sent.PixelData
    harness.work()
    assert len(harness.rows()) == 5


def test_send_names_what_was_not_stored(harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = save_dataset(chest_dataset(), tmp_path / "good.dcm")
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")
    assert _send(str(tmp_path), "--port", str(harness.port)) == 0  # found in a folder: skipped
    assert "notes.txt\t-\tskipped: not DICOM" in capsys.readouterr().out
    assert _send(str(good), str(notes), "--port", str(harness.port)) == 1  # named: a failure
    out, err = capsys.readouterr()
    by_file = {Path(line.split("\t")[0]).name: line for line in out.splitlines()}
    assert by_file[good.name].endswith("stored (0x0000)")
    assert "not DICOM" in by_file["notes.txt"] and "skipped" not in by_file["notes.txt"]
    assert "1 stored, 1 not stored" in err

    closed = free_port()
    assert _send(str(good), "--port", str(closed)) == 1
    assert "connection refused" in capsys.readouterr().out


def test_send_refuses_a_missing_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _send(str(tmp_path / "absent.dcm")) == 2
    assert "no such file or folder" in capsys.readouterr().err
