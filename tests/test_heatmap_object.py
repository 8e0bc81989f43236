"""The heatmap filed in the PACS (issue 31, point 2): the Secondary Capture built with highdicom
(``outputs.heatmapobject``), the triage SR that references it (template and full build, dciodvfy and Pixelmed), and
the worker writing both and forwarding the heatmap before its SR in the same outbox row.

Real radiographs of the shared folder with the shipped model's Grad-CAM maps; real listener, worker, SQLite and a
pynetdicom Storage SCP on 127.0.0.1 for the forwarding.
"""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from conftest import chest_dataset, free_port
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select
from test_sr import dciodvfy
from test_srtemplate import comparable

from cxr_triage import BUNDLED_MODEL
from cxr_triage.core import db
from cxr_triage.ml.checkpoint import load_classifier
from cxr_triage.ml.heatmap import GradCAMHeatmap
from cxr_triage.ml.preprocess import PreparedImage, prepare_dataset, read_dicom
from cxr_triage.outputs import forward, sr
from cxr_triage.outputs.heatmapobject import NOTICE, HeatmapSecondaryCapture
from cxr_triage.outputs.srtemplate import TriageSRBuilder
from cxr_triage.testing.peers import dcmtk_tool, pixelmed_validate

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
FILES = ("fo-dicom_CR-MONO1-10-chest.dcm", "nih-cxr14-dx-no-finding.dcm", "pydicom-data_RG1_UNCR.dcm")
PROBABILITIES = {"covid": 0.1, "normal": 0.2, "pneumonia": 0.7}
SHA = "cd" * 32


@pytest.fixture(scope="module")
def objects() -> list[tuple[pydicom.Dataset, np.ndarray, torch.Tensor]]:
    """(header without pixels, decoded radiograph, shipped model's coarse map) of each shared radiograph."""
    heatmap = GradCAMHeatmap(load_classifier(BUNDLED_MODEL).model)
    found = []
    for name in FILES:
        ds = read_dicom(SHARED_DICOM / name)
        assert isinstance(ds, pydicom.Dataset)
        image = prepare_dataset(ds, keep_display=True)
        assert isinstance(image, PreparedImage) and image.display is not None
        del ds.PixelData
        found.append((ds, image.display, heatmap.coarse(image.tensor[None]).maps[0]))
    return found


def test_the_secondary_capture_is_the_radiograph_with_the_map_and_the_notice(objects, tmp_path: Path) -> None:
    builder = HeatmapSecondaryCapture(opacity=0.5)
    for index, (header, display, coarse) in enumerate(objects):
        image = builder.build(header, display, coarse, model_version="v7")
        assert image.SOPClassUID == SecondaryCaptureImageStorage
        assert (image.Rows, image.Columns) == display.shape, "the radiograph's own geometry, not 224x224"
        assert image.StudyInstanceUID == header.StudyInstanceUID
        assert image.SeriesInstanceUID != header.SeriesInstanceUID and image.SOPInstanceUID != header.SOPInstanceUID
        assert image.PatientID == header.get("PatientID") and image.BurnedInAnnotation == "YES"
        assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
        assert image.PhotometricInterpretation == "RGB" and image.SamplesPerPixel == 3
        pixels = image.pixel_array
        band = pixels[: max(20, pixels.shape[0] // 20)]
        assert (band[0] == 0).all() and (band.min(axis=2) > 180).any(), "white notice on a black band"
        below = pixels[pixels.shape[0] // 4 :]
        grey = np.repeat(display[display.shape[0] // 4 :, :, None], 3, axis=2)
        coloured = (below.astype(int) - grey).any(axis=2)
        assert 0.05 < coloured.mean() <= 1.0, "the map is blended in"
        path = tmp_path / f"{index}.dcm"
        image.save_as(path, enforce_file_format=True)
        assert dciodvfy(path)[0] == []
    assert NOTICE.format(version="v7") == "NOT FOR DIAGNOSIS - AI heatmap, model v7"


def test_where_the_map_is_zero_the_radiograph_is_unchanged(objects) -> None:
    header, display, _ = objects[2]
    zeros = torch.zeros(14, 14)
    pixels = HeatmapSecondaryCapture().pixels(display, zeros, "v1")
    below = slice(pixels.shape[0] // 4, None)
    assert (pixels[below] == display[below, :, None]).all()
    with pytest.raises(ValueError, match="are not the image's"):
        HeatmapSecondaryCapture().build(header, display[:-1], zeros, model_version="v1")
    with pytest.raises(ValueError, match="model_version"):
        HeatmapSecondaryCapture().build(header, display, zeros, model_version="")


def test_the_sr_references_the_heatmap_and_passes_dciodvfy_and_pixelmed(objects, tmp_path: Path) -> None:
    builder, reports = TriageSRBuilder(), TriageSRBuilder()
    paths = []
    for index, (header, display, coarse) in enumerate(objects):
        image = HeatmapSecondaryCapture().build(header, display, coarse, model_version="v1")
        common = dict(label="pneumonia", probabilities=PROBABILITIES, model_version="v1", model_sha256=SHA)
        filled = builder.build(header, flagged=True, heatmap=image, series_instance_uid="1.2.3.4", **common)
        full = sr.build_triage_sr(
            header, flagged=True, heatmap=image, series_instance_uid="1.2.3.4", sop_instance_uid=filled.SOPInstanceUID,
            **common,
        )  # fmt: skip
        assert comparable(filled) == comparable(full), "the template's report equals highdicom's"
        evidence = {
            item.ReferencedSOPInstanceUID
            for study in filled.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        assert evidence == {header.SOPInstanceUID, image.SOPInstanceUID}
        without = reports.build(header, flagged=False, **common)
        assert image.SOPInstanceUID not in sr.sr_to_bytes(without).decode("latin-1")
        path = tmp_path / f"{index}.dcm"
        path.write_bytes(sr.sr_to_bytes(filled))
        paths.append(path)
        assert dciodvfy(path)[0] == []
        dump = subprocess.run([dcmtk_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and '<contains IMAGE:(,,"Illustration of ROI")=(SC image,)>' in dump.stdout
    results = pixelmed_validate(paths)
    assert {name: errors for name, (errors, _) in results.items() if errors} == {}
    for _, warnings in results.values():
        assert all("Priority" in line for line in warnings), warnings  # the one warning docs/SR.md explains


@contextmanager
def pacs(port: int, sc_status: list[int] | None, ssl_context: Any = None) -> Iterator[list[pydicom.Dataset]]:
    """A Storage SCP storing SRs and, unless ``sc_status`` is None, Secondary Captures (answered ``sc_status[0]``);
    over TLS with ``ssl_context``."""
    received: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        if ds.SOPClassUID == SecondaryCaptureImageStorage and sc_status is not None and sc_status[0] != 0:
            return sc_status[0]
        received.append(ds)
        return 0

    ae = AE(ae_title="PACS")
    for sop_class in (ComprehensiveSRStorage, *([SecondaryCaptureImageStorage] if sc_status is not None else [])):
        ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    handlers = [(evt.EVT_C_STORE, on_store)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers, ssl_context=ssl_context)
    try:
        yield received
    finally:
        server.shutdown()


def _sr_rows(harness) -> list[db.SRDocument]:
    with harness.sessions() as session:
        rows = list(session.scalars(select(db.SRDocument).order_by(db.SRDocument.id)).all())
        session.expunge_all()
    return rows


def _forward_rows(harness) -> list[db.Forward]:
    with harness.sessions() as session:
        rows = list(session.scalars(select(db.Forward).order_by(db.Forward.id)).all())
        session.expunge_all()
    return rows


def test_the_worker_files_the_heatmap_beside_its_sr_and_forwards_it_first(make_harness) -> None:
    port = free_port()
    harness = make_harness(forward={"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": port}]})
    ds = chest_dataset(rows=96, cols=80, seed=11)
    with pacs(port, [0]) as received:
        harness.send([ds])
        harness.work()
    (row,) = _sr_rows(harness)
    assert row.heatmap_sop_instance_uid and row.heatmap_series_instance_uid and row.heatmap_path
    assert Path(row.heatmap_path).parent == Path(row.path).parent, "beside the SR, in its study folder"
    stored = pydicom.dcmread(row.heatmap_path)
    assert stored.SOPInstanceUID == row.heatmap_sop_instance_uid and (stored.Rows, stored.Columns) == (96, 80)
    assert stored.StudyInstanceUID == ds.StudyInstanceUID and stored.SeriesInstanceUID != row.series_instance_uid
    assert [(x.SOPClassUID, x.SOPInstanceUID) for x in received] == [
        (SecondaryCaptureImageStorage, row.heatmap_sop_instance_uid),
        (ComprehensiveSRStorage, row.sop_instance_uid),
    ]
    evidence = received[1].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert row.heatmap_sop_instance_uid in {
        item.ReferencedSOPInstanceUID for s in evidence for item in s.ReferencedSOPSequence
    }
    assert [(f.state, f.attempts) for f in _forward_rows(harness)] == [(db.FORWARD_SENT, 1)]


def test_the_heatmap_goes_over_tls_with_its_sr(make_harness, tmp_path: Path) -> None:
    from test_scu import self_signed, server_tls

    cert, key = self_signed(tmp_path, "pacs")
    port = free_port()
    destination = {"ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": True}
    harness = make_harness(forward={"destinations": [destination], "tls_ca_file": str(cert), "timeout": 5})
    with pacs(port, [0], server_tls(cert, key)) as received:
        harness.send([chest_dataset(seed=17)])
        harness.work()
    (row,) = _sr_rows(harness)
    assert [x.SOPInstanceUID for x in received] == [row.heatmap_sop_instance_uid, row.sop_instance_uid]
    assert [f.state for f in _forward_rows(harness)] == [db.FORWARD_SENT]


def test_a_heatmap_the_pacs_fails_to_store_holds_its_sr_back_until_both_are_stored(make_harness) -> None:
    port = free_port()
    destination = {"ae_title": "PACS", "host": "127.0.0.1", "port": port}
    harness = make_harness(forward={"destinations": [destination], "backoff_seconds": 10, "timeout": 5})
    status = [0xA700]
    with pacs(port, status) as received:
        harness.send([chest_dataset(seed=12)])
        harness.work()
        (row,) = _forward_rows(harness)
        assert (row.state, row.attempts, row.status) == (db.FORWARD_PENDING, 1, 0xA700)
        assert row.last_error.startswith("heatmap object: C-STORE failed with status 0xA700")
        assert received == [], "the SR waits for its heatmap object: the PACS never has one without the other"
        status[0] = 0
        later = db.utcnow() + dt.timedelta(seconds=11)
        (outcome,) = forward.process_due(harness.sessions, harness.settings.forward, now=later)
    assert (outcome.state, outcome.attempts) == (db.FORWARD_SENT, 2)
    (sr_row,) = _sr_rows(harness)
    assert [x.SOPInstanceUID for x in received] == [sr_row.heatmap_sop_instance_uid, sr_row.sop_instance_uid]


def test_a_pacs_without_secondary_capture_still_gets_the_sr(make_harness, caplog) -> None:
    port = free_port()
    harness = make_harness(forward={"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": port}]})
    with pacs(port, None) as received, caplog.at_level(logging.WARNING):
        harness.send([chest_dataset(seed=13)])
        harness.work()
    (sr_row,) = _sr_rows(harness)
    assert [x.SOPInstanceUID for x in received] == [sr_row.sop_instance_uid]
    assert [f.state for f in _forward_rows(harness)] == [db.FORWARD_SENT]
    assert [r for r in caplog.records if "does not store Secondary Captures" in r.getMessage()]


def test_no_heatmap_object_when_it_is_off_or_fails(make_harness, monkeypatch, caplog) -> None:
    off = make_harness(heatmap={"pacs_object": "none"})
    off.send([chest_dataset(seed=14)])
    off.work()
    (row,) = _sr_rows(off)
    assert row.heatmap_sop_instance_uid is None and row.heatmap_path is None
    assert len(list(Path(row.path).parent.iterdir())) == 1

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("no pixels today")

    monkeypatch.setattr(HeatmapSecondaryCapture, "build", broken)
    failing = make_harness()
    failing.send([chest_dataset(seed=15)])
    with caplog.at_level(logging.ERROR):
        failing.work()
    (row,) = _sr_rows(failing)
    assert row.heatmap_sop_instance_uid is None and Path(row.path).is_file()
    assert failing.rows()[0]["status"] == "ok" and failing.rows()[0]["label"]
    assert [r for r in caplog.records if "heatmap object could not be made" in r.getMessage()]


def test_a_report_that_cannot_be_built_leaves_no_heatmap_object_behind(make_harness, monkeypatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("no report today")

    monkeypatch.setattr(TriageSRBuilder, "build", broken)
    harness = make_harness()
    harness.send([chest_dataset(seed=16)])
    harness.work()
    (row,) = harness.rows()
    assert row["status"] == "ok" and row["sr_sop_instance_uid"] is None
    assert "Structured Report not written" in row["reason"]
    sr_dir = Path(harness.config["storage"]["sr_dir"])
    assert [p for p in sr_dir.rglob("*") if p.is_file()] == [], "no heatmap object without its report"
    with harness.sessions() as session:
        assert session.scalars(select(db.Instance.heatmap_path)).one() is not None, "the map itself is kept"


def test_a_heatmap_never_stored_dead_letters_its_row_and_a_retry_sends_both(make_harness) -> None:
    port = free_port()
    destination = {"ae_title": "PACS", "host": "127.0.0.1", "port": port}
    harness = make_harness(forward={"destinations": [destination], "max_attempts": 1, "timeout": 5})
    status = [0xA700]
    with pacs(port, status) as received:
        harness.send([chest_dataset(seed=18)])
        harness.work()
        (row,) = _forward_rows(harness)
        assert row.state == db.FORWARD_DEAD and row.last_error.startswith("heatmap object: ")
        assert received == []
        status[0] = 0
        assert forward.requeue_dead(harness.sessions) == 1
        (outcome,) = forward.process_due(harness.sessions, harness.settings.forward, force=True)
    assert outcome.state == db.FORWARD_SENT
    (sr_row,) = _sr_rows(harness)
    assert [x.SOPInstanceUID for x in received] == [sr_row.heatmap_sop_instance_uid, sr_row.sop_instance_uid]
