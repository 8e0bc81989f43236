"""The pixel check for lateral views (``cxr_triage.ml.symmetry``) and where the product applies it.

The shared data hold no lateral view, so the refused inputs here are synthetic asymmetric images (the frontal
phantom with its midline moved to the side), not laterals; the real lateral views the check was measured on are
in ``docs/RESULTS.md``. The real frontal radiographs of ``../shared/data`` must pass.
"""

from __future__ import annotations

import csv
from pathlib import Path

import dicom_factory as factory
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from cxr_triage.ml import symmetry
from cxr_triage.ml.imaging import to_model_input
from cxr_triage.ml.preprocess import VIEW_ASSUMED, PreparedImage, Refusal, prepare_dataset, prepare_path
from cxr_triage.ml.symmetry import ViewVerdict, check_view, cues
from cxr_triage.testing.synthetic import new_dataset, phantom

SHARED_CXR = factory.SHARED_DICOM.parent / "cxr"


def off_centre(rows: int = 256, cols: int = 256) -> np.ndarray:
    """The frontal phantom rolled by a quarter of its width: one lung at the edge, the two lungs' dark fields meeting
    in the middle and the mediastinum off to one side (synthetic and asymmetric; not a lateral view)."""
    return np.roll(phantom(rows, cols), cols // 4, axis=1)


def as_stored(display: np.ndarray) -> np.ndarray:
    return np.round(display * 4095).astype(np.uint16)


def test_the_frontal_phantom_passes_and_its_off_centre_copy_is_refused() -> None:
    frontal = check_view(to_model_input(phantom(192, 160).astype(np.float32)))
    moved = check_view(to_model_input(off_centre().astype(np.float32)))
    assert frontal.verdict is ViewVerdict.FRONTAL and frontal.score > symmetry.THRESHOLD
    assert moved.verdict is ViewVerdict.LATERAL and moved.score < symmetry.THRESHOLD
    assert "looks like a lateral view" in moved.reason() and f"{symmetry.THRESHOLD:.2f}" in moved.reason()


def test_a_mirrored_image_scores_as_the_image() -> None:
    image = to_model_input(off_centre(200, 240).astype(np.float32))
    assert check_view(image).score == pytest.approx(check_view(image.flip(-1)).score, abs=0.05)


def test_cues_take_batches_and_single_inputs_and_refuse_other_shapes() -> None:
    batch = torch.stack([to_model_input(phantom(96, 80).astype(np.float32)) for _ in range(3)])
    assert cues(batch).shape == (3, len(symmetry.CUES))
    assert torch.allclose(cues(batch[0]), cues(batch)[:1])
    with pytest.raises(ValueError, match="224x224"):
        cues(torch.zeros(1, 3, 100, 100))


def test_a_blank_or_non_finite_score_is_refused() -> None:
    assert symmetry.ViewCheck(float("nan")).verdict is ViewVerdict.LATERAL
    assert check_view(torch.full((3, 224, 224), 0.5)).verdict is ViewVerdict.LATERAL


@pytest.fixture(scope="module")
def real_inputs() -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(factory.SHARED_DICOM.glob("*.dcm")):
        prepared = prepare_path(path)
        assert isinstance(prepared, PreparedImage), (path.name, prepared)
        out[path.name] = prepared.tensor
    return out


@pytest.mark.parametrize("render", [lambda x: 0.25 + 0.5 * x, lambda x: x**0.8, lambda x: x**1.25])
def test_window_and_gamma_barely_move_the_score_of_the_real_radiographs(  # noqa: ANN001
    real_inputs: dict[str, torch.Tensor], render
) -> None:
    for name, tensor in real_inputs.items():
        rendered = render(tensor[0])[None].expand(3, -1, -1)
        assert check_view(rendered).score == pytest.approx(check_view(tensor).score, abs=0.25), name


def test_the_real_dicoms_pass_and_the_one_without_a_view_is_checked(real_inputs: dict[str, torch.Tensor]) -> None:
    assert len(real_inputs) == 5
    for name, tensor in real_inputs.items():
        assert check_view(tensor).verdict is ViewVerdict.FRONTAL, name
    nih = prepare_path(factory.SHARED_DICOM / "nih-cxr14-dx-no-finding.dcm")
    assert isinstance(nih, PreparedImage) and VIEW_ASSUMED in nih.notes


def test_most_labelled_frontal_radiographs_of_every_source_pass() -> None:
    with (SHARED_CXR / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    per_source: dict[str, list[str]] = {}
    for row in rows:
        per_source.setdefault(row["source"], []).append(row["path"])
    passed = total = 0
    for paths in per_source.values():
        for path in paths[:: max(1, len(paths) // 6)][:6]:
            prepared = prepare_path(SHARED_CXR / path)
            total += 1
            passed += isinstance(prepared, PreparedImage)
    assert total >= 30
    assert passed >= 0.9 * total


def test_a_dicom_without_a_view_is_refused_by_its_pixels_with_the_code_and_reason() -> None:
    ds = new_dataset(as_stored(off_centre()), bits_stored=12, ViewPosition=None)
    refusal = prepare_dataset(ds)
    assert isinstance(refusal, Refusal)
    assert refusal.code == symmetry.REFUSAL_CODE == "looks_lateral"
    assert refusal.attribute == "PixelData" and refusal.sop_instance_uid == ds.SOPInstanceUID
    assert refusal.reason.startswith("looks like a lateral view (left-right symmetry")


def test_a_header_that_tells_the_view_decides_and_the_pixels_are_not_checked() -> None:
    told = [{"ViewPosition": "PA"}, {"ViewPosition": None, "PatientOrientation": ["L", "F"]}]
    for attributes in told:
        assert isinstance(
            prepare_dataset(new_dataset(as_stored(off_centre()), bits_stored=12, **attributes)), PreparedImage
        )
    lateral = prepare_dataset(new_dataset(as_stored(phantom(128, 128)), bits_stored=12, ViewPosition="LL"))
    assert isinstance(lateral, Refusal) and lateral.code == "not_frontal"  # the header's refusal, as before


def test_png_and_jpeg_inputs_are_checked(tmp_path: Path) -> None:
    grey = np.round(off_centre() * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "moved.png")
    Image.fromarray(grey).save(tmp_path / "moved.jpg", quality=95)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "moved16.png")
    Image.fromarray(np.round(phantom(256, 256) * 255).astype(np.uint8)).save(tmp_path / "frontal.png")
    for name in ("moved.png", "moved.jpg", "moved16.png"):
        refusal = prepare_path(tmp_path / name)
        assert isinstance(refusal, Refusal) and refusal.code == "looks_lateral", name
        assert refusal.attribute is None and refusal.sop_instance_uid is None
    assert isinstance(prepare_path(tmp_path / "frontal.png"), PreparedImage)


def test_classify_reports_the_pixel_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from cxr_triage.cli import main

    Image.fromarray(np.round(off_centre() * 255).astype(np.uint8)).save(tmp_path / "moved.png")
    ds = new_dataset(as_stored(off_centre()), bits_stored=12, ViewPosition=None)
    pydicom.dcmwrite(tmp_path / "moved.dcm", ds, enforce_file_format=True)
    assert main(["classify", "--json", "--no-gate", str(tmp_path / "moved.png"), str(tmp_path / "moved.dcm")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["status"] for line in lines] == ["rejected", "rejected"]
    assert all("looks like a lateral view" in line["reason"] for line in lines)


def test_the_workers_preprocess_stage_refuses_by_the_pixels(tmp_path: Path) -> None:
    import threading

    from cxr_triage.queue.jobqueue import ClaimedJob
    from cxr_triage.triage.pipeline import Refused, preprocess

    moved = new_dataset(as_stored(off_centre()), bits_stored=12, ViewPosition=None)
    frontal = new_dataset(as_stored(phantom(256, 256)), bits_stored=12, ViewPosition=None)
    jobs = []
    for number, ds in enumerate((moved, frontal), 1):
        path = tmp_path / f"{number}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        jobs.append(ClaimedJob(number, ds.SOPInstanceUID, ds.StudyInstanceUID, str(path), 1))
    outcomes, prepared = preprocess(jobs, threading.Event())
    assert [type(o) for o in outcomes] == [Refused] and [p.job.id for p in prepared] == [2]
    refused = outcomes[0]
    assert isinstance(refused, Refused) and refused.refusal.code == "looks_lateral"
    assert refused.refusal.sop_instance_uid == moved.SOPInstanceUID
