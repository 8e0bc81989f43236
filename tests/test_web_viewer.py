"""The study page's viewer routes (``cxr_triage.web.viewer``): a received radiograph's pixels at its own resolution
with its window, its heatmap as the worker stores it, the thumbnail when the spool no longer keeps the file, and
the same login and ``study-viewed`` audit as the other reads.

The application runs in-process (FastAPI's TestClient) over a harness whose listener received the real shared
radiographs (``../shared/data/dicom``) or synthetic ones; the heatmap is written with ``save_coarse`` and its path
set on the instance, as the worker will.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from conftest import SHARED_DICOM, chest_dataset
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from test_web import add_user
from test_web_reading import log_in, reader

from cxr_triage.core import db
from cxr_triage.ml.heatmap import save_coarse
from cxr_triage.ops.retention import purge_spool
from cxr_triage.testing import synthetic
from cxr_triage.web import radiograph

LOSSLESS = SHARED_DICOM / "pydicom-data_RG1_J2KR.dcm"  # 1955 x 1841 CR, MONOCHROME1, JPEG 2000 lossless
UNCOMPRESSED = SHARED_DICOM / "pydicom-data_RG1_UNCR.dcm"  # the same pixels, uncompressed
NIH = SHARED_DICOM / "nih-cxr14-dx-no-finding.dcm"  # 1024 x 1024, 8 bits, no window in its header


def _received(harness: Any, items: list[Any]) -> dict[str, int]:
    """Send and process ``items``; the instance id of each SOP Instance UID."""
    assert set(harness.send(items)) == {0}
    harness.work()
    with harness.sessions() as session:
        return dict(session.execute(select(db.Instance.sop_instance_uid, db.Instance.id)).all())


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _viewer(harness: Any, **web: Any) -> TestClient:
    add_user(harness)
    client = reader(harness, **web)
    log_in(client)
    return client


def test_a_real_radiograph_is_served_at_its_own_resolution_with_the_dicoms_window(make_harness) -> None:
    harness = make_harness()
    ids = _received(harness, [LOSSLESS, NIH])
    web = _viewer(harness)

    meta = web.get(f"/api/instances/{ids[_uid(LOSSLESS)]}/radiograph").json()
    assert meta["available"] and (meta["rows"], meta["columns"]) == (1955, 1841), "its own rows and columns"
    assert (meta["source_rows"], meta["source_columns"], meta["step"]) == (1955, 1841, 1)
    assert meta["window"]["center"] == 15000 and meta["window"]["width"] == 30000
    assert "DICOM header" in meta["window"]["source"] and meta["window"]["function"] == "LINEAR"
    assert meta["photometric"] == "MONOCHROME1" and meta["invert"] is True
    raw = web.get(meta["pixels"])
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["cache-control"] == "private, no-store"
    served = np.frombuffer(raw.content, dtype="<u2").reshape(1955, 1841)
    expected = pydicom.dcmread(UNCOMPRESSED).pixel_array  # no rescale: the modality values are the stored ones
    assert (meta["slope"], meta["intercept"]) == (1.0, 0.0)
    assert np.array_equal(served, expected), "JPEG 2000 lossless decoded to the very pixels of the uncompressed file"
    assert meta["max_value"] == int(expected.max())

    nih = web.get(f"/api/instances/{ids[_uid(NIH)]}/radiograph").json()
    assert (nih["rows"], nih["columns"], nih["invert"]) == (1024, 1024, False)
    pixels = pydicom.dcmread(NIH).pixel_array
    low, high = int(pixels.min()), int(pixels.max())
    assert "pixel range" in nih["window"]["source"], "no window in the header: one from the image's range"
    assert (nih["window"]["center"], nih["window"]["width"]) == ((low + high + 1) / 2, high - low + 1)


def test_rescaled_values_are_coded_exactly_and_the_page_carries_the_viewer(make_harness, monkeypatch) -> None:
    harness = make_harness()
    ds = synthetic.rescaled_dx(96)
    ids = _received(harness, [ds])
    web = _viewer(harness)
    instance = ids[str(ds.SOPInstanceUID)]
    meta = web.get(f"/api/instances/{instance}/radiograph").json()
    served = np.frombuffer(web.get(meta["pixels"]).content, dtype="<u2").reshape(96, 96).astype(np.float64)
    modality = served * meta["slope"] + meta["intercept"]
    assert np.array_equal(modality, ds.pixel_array * 0.25 - 1024.0), "modality = value * slope + intercept"
    assert (meta["window"]["center"], meta["window"]["width"], meta["invert"]) == (6000.0, 12000.0, False)

    page = web.get(f"/studies/{ds.StudyInstanceUID}")
    assert f'id="viewer" data-instance="{instance}"' in page.text and 'src="/static/viewer.js"' in page.text
    assert "where the model looked &mdash; not a diagnosis" in page.text and 'id="heatmap-toggle"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"], "the script is served, not inline"
    script = web.get("/static/viewer.js")
    assert script.status_code == 200 and "radiograph.raw" in script.text

    monkeypatch.setattr(radiograph, "MAX_PIXELS", 48 * 48)  # over the cap: reduced by 2, and the page told so
    capped = reader(harness)
    log_in(capped)
    small = capped.get(f"/api/instances/{instance}/radiograph").json()
    assert (small["rows"], small["columns"], small["step"], small["source_rows"]) == (48, 48, 2, 96)
    assert len(capped.get(small["pixels"]).content) == 48 * 48 * 2


def test_a_study_of_several_images_offers_each_to_the_viewer(make_harness) -> None:
    harness = make_harness()
    study = generate_uid()
    sent = [chest_dataset(seed=s, StudyInstanceUID=study) for s in (46, 47)]
    ids = _received(harness, sent)
    page = _viewer(harness).get(f"/studies/{study}").text
    first, second = (ids[str(ds.SOPInstanceUID)] for ds in sent)
    assert f'id="viewer" data-instance="{first}"' in page and '<select id="viewer-instance">' in page
    assert f'<option value="{first}" selected>' in page and f'<option value="{second}" >' in page


def test_the_heatmap_is_served_as_the_worker_stored_it_and_404_without_one(make_harness) -> None:
    harness = make_harness()
    ids = _received(harness, [chest_dataset(seed=41), chest_dataset(seed=42)])
    first, second = sorted(ids.values())
    coarse = torch.arange(14 * 14, dtype=torch.float32).reshape(14, 14)  # a ramp: 0 top-left, 1 bottom-right
    path = save_coarse(harness.tmp / "heatmaps" / f"{first}.npy", coarse)
    with harness.sessions() as session, session.begin():
        session.execute(update(db.Instance).where(db.Instance.id == first).values(heatmap_path=str(path)))
        # the second as classified with [heatmap] enabled = false (the worker stores a map by default)
        session.execute(update(db.Instance).where(db.Instance.id == second).values(heatmap_path=None))
    web = _viewer(harness)

    heat = web.get(f"/api/instances/{first}/heatmap")
    assert heat.status_code == 200
    body = heat.json()
    assert (body["rows"], body["columns"]) == (14, 14) and "not a diagnosis" in body["meaning"]
    values = np.asarray(body["values"]).reshape(14, 14)
    assert np.allclose(values, coarse.numpy() / 195.0, atol=1e-3) and values.max() == 1.0
    assert web.get(f"/api/instances/{first}/radiograph").json()["heatmap"] == f"/api/instances/{first}/heatmap"

    missing = web.get(f"/api/instances/{second}/heatmap")
    assert missing.status_code == 404 and "no heatmap" in missing.json()["detail"]
    assert web.get(f"/api/instances/{second}/radiograph").json()["heatmap"] is None
    path.unlink()
    assert web.get(f"/api/instances/{first}/heatmap").status_code == 404, "a path whose file is gone: no heatmap"
    assert web.get("/api/instances/999/heatmap").status_code == 404


def test_when_the_spool_no_longer_keeps_the_file_the_thumbnail_is_offered(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=43)
    instance = _received(harness, [ds])[str(ds.SOPInstanceUID)]
    web = _viewer(harness)
    assert web.get(f"/api/instances/{instance}/radiograph").json()["available"] is True
    assert purge_spool(harness.sessions, 1.0, now=db.utcnow() + dt.timedelta(days=2)) == 1

    meta = web.get(f"/api/instances/{instance}/radiograph").json()
    assert meta["available"] is False and "no longer kept" in meta["reason"]
    assert meta["thumbnail"] == f"/thumbnails/{instance}.png"
    assert web.get(meta["thumbnail"]).headers["content-type"] == "image/png"
    raw = web.get(f"/api/instances/{instance}/radiograph.raw")
    assert raw.status_code == 404 and "no longer kept" in raw.json()["detail"]
    study = web.get(f"/api/studies/{ds.StudyInstanceUID}").json()
    assert [(i["radiograph"], i["thumbnail"]) for i in study["instance_list"]] == [(False, True)]


def test_pixels_with_burned_in_annotation_are_not_served(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=45, BurnedInAnnotation="YES")
    instance = _received(harness, [ds])[str(ds.SOPInstanceUID)]
    web = _viewer(harness)
    meta = web.get(f"/api/instances/{instance}/radiograph").json()
    assert meta["available"] is False and "BurnedInAnnotation (0028,0301) is YES" in meta["reason"]
    assert meta["thumbnail"] is None, "the worklist keeps no thumbnail of them either"
    assert web.get(f"/api/instances/{instance}/radiograph.raw").status_code == 404


def test_the_viewer_routes_need_a_login_and_leave_the_study_viewed_audit(make_harness) -> None:
    harness = make_harness()
    ds = chest_dataset(seed=44)
    instance = _received(harness, [ds])[str(ds.SOPInstanceUID)]
    routes = [f"/api/instances/{instance}/{name}" for name in ("radiograph", "radiograph.raw", "heatmap")]
    anonymous = reader(harness)
    for path in routes:
        response = anonymous.get(path)
        assert response.status_code == 401 and response.json() == {"detail": "log in first"}, path
    assert anonymous.get("/static/viewer.js").status_code == 200, "the script holds no patient data"

    web = _viewer(harness)
    assert web.get(routes[0]).status_code == 200 and web.get(routes[1]).status_code == 200
    assert web.get("/api/instances/999/radiograph").status_code == 404
    with harness.sessions() as session:
        rows = session.execute(select(db.AuditEntry.action, db.AuditEntry.username, db.AuditEntry.target)).all()
    assert [tuple(r) for r in rows if r[0] == "study-viewed"] == [("study-viewed", "rad1", ds.StudyInstanceUID)]

    open_reading = reader(harness, anonymous_read=True)
    assert open_reading.get(routes[1]).status_code == 200, "anonymous_read = true: the pixels without a login"
    refused = reader(harness, allowed_networks=["10.0.0.0/8"])
    assert refused.get(routes[1]).status_code == 403, "outside [web] allowed_networks"


def test_a_radiograph_over_the_cap_is_reduced_by_a_whole_factor() -> None:
    values = np.arange(5000 * 4000, dtype=np.uint32).reshape(5000, 4000) % 60000
    reduced, step = radiograph.reduce(values.astype(np.uint16))
    assert step == 2 and reduced.shape == (2500, 2000) and reduced.size <= radiograph.MAX_PIXELS
    assert reduced[0, 0] == round(np.mean(values[:2, :2])) and reduced[-1, -1] == round(np.mean(values[-2:, -2:]))
    odd, step = radiograph.reduce(np.ones((7, 5), dtype=np.uint16), limit=12)
    assert step == 2 and odd.shape == (4, 3) and np.all(odd == 1), "edges repeated, not dropped"
    same, step = radiograph.reduce(np.ones((64, 64), dtype=np.uint16))
    assert step == 1 and same.shape == (64, 64)


def test_the_window_is_the_headers_first_else_the_pixel_range() -> None:
    header = Dataset()
    header.WindowCenter, header.WindowWidth, header.VOILUTFunction = [40, 300], [400, 1500], "SIGMOID"
    assert radiograph.window_of(header, 0, 100) == radiograph.Window(
        40.0, 400.0, "SIGMOID", "the DICOM header (WindowCenter / WindowWidth)"
    )
    header.WindowWidth = 0  # not a window (PS3.3 C.11.2.1.2: at least 1)
    fallback = radiograph.window_of(header, -1000.0, 3000.0)
    assert (fallback.center, fallback.width, fallback.function) == (1000.5, 4001.0, "LINEAR")
    lut_only = Dataset()
    lut_only.VOILUTSequence = [Dataset()]
    assert "VOI LUT Sequence" in radiograph.window_of(lut_only, 0.0, 4095.0).source
