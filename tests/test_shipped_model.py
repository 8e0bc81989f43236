"""The model that ships in the repository: intact, research-only, and classifying real chest radiographs out of the
box, in float32 and in bf16 alike (the bf16 path is what ``[model] precision = "auto"`` runs on CPUs and GPUs that
compute bf16 in hardware; elsewhere it is emulated, which is slower but gives the same numbers)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import dicom_factory as factory
import pytest
import torch

from cxr_triage import BUNDLED_MODEL, CLASS_NAMES
from cxr_triage.cli import main
from cxr_triage.ml.checkpoint import load_classifier
from cxr_triage.ml.inference import Predictor
from cxr_triage.ml.preprocess import PreparedImage, prepare_path

pytestmark = pytest.mark.xdist_group("shipped_model")  # one worker: the real images prepared once

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def real_images() -> list[torch.Tensor]:
    """The five shared DICOM files and 30 shared JPEGs (ten per class), prepared for the model."""
    paths = sorted((SHARED / "dicom").glob("*.dcm"))
    with open(SHARED / "cxr" / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for name in CLASS_NAMES:
        in_class = [r for r in rows if r["label"] == name]
        paths += [SHARED / "cxr" / r["path"] for r in in_class[3 :: len(in_class) // 10][:10]]
    prepared = [prepare_path(p) for p in paths]
    assert all(isinstance(p, PreparedImage) for p in prepared), prepared
    return [p.tensor for p in prepared]


def test_the_shipped_file_is_intact_fp16_small_and_versioned() -> None:
    recorded = (BUNDLED_MODEL.parent / (BUNDLED_MODEL.name + ".sha256")).read_text().split()[0]
    assert hashlib.sha256(BUNDLED_MODEL.read_bytes()).hexdigest() == recorded
    assert BUNDLED_MODEL.stat().st_size < 16 * 1024 * 1024
    raw = torch.load(BUNDLED_MODEL, weights_only=True)
    assert {t.dtype for t in raw["state_dict"].values() if t.is_floating_point()} == {torch.float16}
    loaded = load_classifier(BUNDLED_MODEL)
    assert loaded.sha256 == recorded
    assert loaded.card.model_version == "cae-lstm-w16-cpu-1-cal"
    assert loaded.card.temperature == pytest.approx(1.0918, abs=1e-3)  # fitted on the validation split
    prov = loaded.card.provenance
    assert prov["calibration"]["uncalibrated_sha256"].startswith("ff9ac8067b97")
    assert {"command", "config", "counts", "history", "wall_seconds", "test"} <= set(prov)
    assert prov["config"]["width"] == 16 and loaded.card.class_names == CLASS_NAMES


def test_classify_uses_the_shipped_model_on_the_five_shared_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "--json", str(SHARED / "dicom")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    dicom = [r for r in records if r["path"].endswith(".dcm")]
    assert len(dicom) == 5
    for record in dicom:
        assert record["status"] == "ok", record
        assert record["model_version"] == "cae-lstm-w16-cpu-1-cal"
        assert record["typicality"] is not None
        assert record["precision"] in ("float32", "bfloat16")
        assert abs(sum(record["probabilities"].values()) - 1.0) < 1e-4
        assert record["label"] == max(record["probabilities"], key=record["probabilities"].get)


def test_bf16_and_float32_agree_on_real_images(real_images: list[torch.Tensor]) -> None:
    loaded = load_classifier(BUNDLED_MODEL)
    fp32 = Predictor(loaded, device="cpu", precision="float32")
    bf16 = Predictor(load_classifier(BUNDLED_MODEL), device="cpu", precision="bfloat16")
    assert (fp32.precision, bf16.precision) == ("float32", "bfloat16")
    p32, p16 = fp32.probabilities(real_images), bf16.probabilities(real_images)
    assert float((p32 - p16).abs().max()) <= TOLERANCE


def test_every_encoding_gives_the_same_probabilities_in_bf16(tmp_path: Path) -> None:
    display = factory.phantom(256, 224)
    tensors = []
    for variant in factory.VARIANTS:
        prepared = prepare_path(factory.encode(display, variant, tmp_path))
        assert isinstance(prepared, PreparedImage), (variant, prepared)
        tensors.append(prepared.tensor)
    probabilities = Predictor(load_classifier(BUNDLED_MODEL), device="cpu", precision="bfloat16").probabilities(tensors)
    spread = probabilities.max(dim=0).values - probabilities.min(dim=0).values
    assert float(spread.max()) <= TOLERANCE
