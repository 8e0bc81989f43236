"""Inference and ``cxr-triage classify`` : one line per input, refusals included, real files.

Models are tiny checkpoints with random weights (``ModelSpec(width=4, dense_units=8)``): the tests check the
plumbing and the contract of the output, not medical performance.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dicom_factory as factory
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from torch import nn

from cxr_triage import CLASS_NAMES
from cxr_triage.cli import main
from cxr_triage.commands import classify
from cxr_triage.ml import checkpoint
from cxr_triage.ml.checkpoint import ModelCard, load_classifier, save_classifier
from cxr_triage.ml.inference import Predictor
from cxr_triage.ml.model import CAEClassifier, ModelSpec
from cxr_triage.ml.preprocess import PreparedImage, prepare_path

pytestmark = pytest.mark.xdist_group("classify")  # one worker: the models and inputs built once

KEYS = [
    "path",
    "sop_instance_uid",
    "status",
    "label",
    "probabilities",
    "reason",
    "model_version",
    "precision",
    "typicality",
]


def make_model(path: Path, version: str, seed: int) -> Path:
    """A tiny random classifier whose steep head makes its output depend clearly on the picture."""
    torch.manual_seed(seed)
    model = CAEClassifier(ModelSpec(width=4, dense_units=8))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(10.0)
    save_classifier(path, model, ModelCard(spec=model.spec, model_version=version))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {v: make_model(folder / f"{v}.pt", v, seed) for seed, v in enumerate(("alpha", "beta"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with DICOM (real and synthetic), PNG, JPEG and things to refuse, in a subfolder too."""
    folder = tmp_path_factory.mktemp("inputs")
    display = factory.phantom(96, 80)
    grey = np.round(display * 255).astype(np.uint8)
    shutil.copy(factory.SHARED_DICOM / "fo-dicom_CR-MONO1-10-chest.dcm", folder / "a_real_cr.dcm")
    Image.fromarray(grey).save(folder / "b_chest.png")
    Image.fromarray(255 - grey).save(folder / "h_negative.png")
    Image.fromarray(grey).save(folder / "c_chest.jpg", quality=95)
    factory.save(factory.mono1_window(display), folder / "d_synthetic.dcm")
    lateral = factory.mono2_12bit(display)
    lateral.ViewPosition = "LL"
    factory.save(lateral, folder / "e_lateral.dcm")
    (folder / "f_notes.txt").write_text("not an image\n")
    sub = folder / "g_more"
    sub.mkdir()
    factory.encode(display, "jpegls_dcmcjpls", sub)  # writes jpegls_dcmcjpls.dcm and its .source.dcm
    (folder / ".hidden.dcm").write_bytes(b"ignored")
    return folder


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, list[str], str]:
    """``classify`` without the typicality gate: these inputs are phantoms, which it refuses (tests/test_gate.py)."""
    code = main(["classify", "--no-gate", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


# --- Predictor ----------------------------------------------------------------------------------------------------


def test_predictor_gives_probabilities_keyed_by_class(models: dict[str, Path]) -> None:
    predictor = Predictor(load_classifier(models["alpha"]), device="cpu", batch_size=2)
    images = torch.rand(5, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    predictions = predictor.predict(list(images))  # 5 images, batches of 2
    assert len(predictions) == 5
    for prediction in predictions:
        assert tuple(prediction.probabilities) == CLASS_NAMES
        assert math.isclose(sum(prediction.probabilities.values()), 1.0, rel_tol=1e-5)
        assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.__getitem__)
    whole = Predictor(load_classifier(models["alpha"]), device="cpu", batch_size=16).probabilities(images)
    torch.testing.assert_close(predictor.probabilities(images), whole)
    assert predictor.model_version == "alpha" and predictor.device.type == "cpu"


def test_predictor_handles_no_images(models: dict[str, Path]) -> None:
    predictor = Predictor(load_classifier(models["alpha"]), device="cpu")
    assert predictor.probabilities(torch.empty(0, 3, 224, 224)).shape == (0, 3)


# --- cxr-triage classify ------------------------------------------------------------------------------------------


def test_classify_json_one_line_per_input(
    inputs: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines, _ = run_cli(capsys, "--json", "--model", models["alpha"], "--batch-size", "2", inputs)
    assert code == 0
    records = [json.loads(line) for line in lines]
    expected_files = sorted(p for p in inputs.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert [r["path"] for r in records] == [str(p) for p in expected_files]
    for record in records:
        assert list(record) == KEYS
        assert record["model_version"] == "alpha" and record["typicality"] is None  # --no-gate
    by_name = {Path(r["path"]).name: r for r in records}

    ok = ("a_real_cr.dcm", "b_chest.png", "c_chest.jpg", "d_synthetic.dcm", "h_negative.png", "jpegls_dcmcjpls.dcm")
    for name in ok:
        record = by_name[name]
        assert record["status"] == "ok", record
        assert list(record["probabilities"]) == ["covid", "normal", "pneumonia"]
        assert math.isclose(sum(record["probabilities"].values()), 1.0, abs_tol=1e-5)
        assert record["label"] == max(record["probabilities"], key=record["probabilities"].get)
    assert by_name["b_chest.png"]["sop_instance_uid"] is None
    assert by_name["c_chest.jpg"]["sop_instance_uid"] is None
    real = factory.SHARED_DICOM / "fo-dicom_CR-MONO1-10-chest.dcm"
    assert by_name["a_real_cr.dcm"]["sop_instance_uid"] == pydicom.dcmread(real, force=True).SOPInstanceUID

    lateral = by_name["e_lateral.dcm"]
    assert lateral["status"] == "rejected" and "ViewPosition" in lateral["reason"] and "LL" in lateral["reason"]
    assert lateral["label"] is None and lateral["probabilities"] is None
    assert lateral["sop_instance_uid"] == pydicom.dcmread(inputs / "e_lateral.dcm").SOPInstanceUID
    assert by_name["f_notes.txt"]["status"] == "rejected"


def test_same_picture_same_probabilities_through_every_door(
    inputs: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """PNG, MONOCHROME1 DICOM and JPEG-LS DICOM of one picture: probabilities within 0.01, while the
    same model tells the photographic negative of the picture apart (so the agreement is not for free)."""
    files = [inputs / "b_chest.png", inputs / "d_synthetic.dcm", inputs / "g_more" / "jpegls_dcmcjpls.dcm"]
    code, lines, _ = run_cli(capsys, "--json", "--model", models["beta"], *files, inputs / "h_negative.png")
    assert code == 0
    *same, negative = [json.loads(line)["probabilities"] for line in lines]

    def distance(p: dict[str, float], q: dict[str, float]) -> float:
        return max(abs(p[k] - q[k]) for k in CLASS_NAMES)

    assert all(distance(other, same[0]) <= 0.01 for other in same[1:])
    assert distance(negative, same[0]) > 0.05


def test_every_encoding_gives_the_same_probabilities(models: dict[str, Path], tmp_path: Path) -> None:
    """The real encodings of one image give the same probabilities to within 0.01."""
    display = factory.phantom(96, 80)
    tensors = []
    for variant in factory.VARIANTS:
        prepared = prepare_path(factory.encode(display, variant, tmp_path))
        assert isinstance(prepared, PreparedImage), (variant, prepared)
        tensors.append(prepared.tensor)
    probabilities = Predictor(load_classifier(models["beta"]), device="cpu").probabilities(tensors)
    spread = probabilities.max(dim=0).values - probabilities.min(dim=0).values
    assert float(spread.max()) <= 0.01


def test_model_option_chooses_the_checkpoint(
    inputs: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    png = inputs / "b_chest.png"
    _, alpha, _ = run_cli(capsys, "--json", "--model", models["alpha"], png)
    _, beta, _ = run_cli(capsys, "--json", "--model", models["beta"], png)
    a, b = json.loads(alpha[0]), json.loads(beta[0])
    assert (a["model_version"], b["model_version"]) == ("alpha", "beta")
    assert a["probabilities"] != b["probabilities"]


def test_text_output_one_line_per_input(
    inputs: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines, _ = run_cli(capsys, "--model", models["alpha"], inputs / "b_chest.png", inputs / "e_lateral.dcm")
    assert code == 0 and len(lines) == 2
    assert lines[0].split("\t")[1] == "ok" and lines[1].split("\t")[1] == "rejected"


def test_unexpected_failure_is_an_error_line_not_a_crash(
    inputs: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_prepare = classify.prepare_path

    def flaky(path: Path) -> object:
        if path.name == "b_chest.png":
            raise MemoryError("simulated")
        return real_prepare(path)

    monkeypatch.setattr(classify, "prepare_path", flaky)
    files = (inputs / "b_chest.png", inputs / "c_chest.jpg")
    code, lines, _ = run_cli(capsys, "--json", "--model", models["alpha"], *files)
    records = [json.loads(line) for line in lines]
    assert code == 0
    assert [r["status"] for r in records] == ["error", "ok"]
    assert "MemoryError" in records[0]["reason"]


def test_missing_input_path_fails(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = run_cli(capsys, "--json", "--model", models["alpha"], tmp_path / "nope.dcm")
    assert code != 0 and lines == [] and "nope.dcm" in err


def test_no_model_fails_with_instructions(
    inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint, "BUNDLED_MODEL", tmp_path / "absent.pt")
    code, lines, err = run_cli(capsys, "--json", inputs / "b_chest.png")
    assert code != 0 and lines == []
    assert "no model" in err and "--model" in err
    code, _, err = run_cli(capsys, "--model", tmp_path / "other.pt", inputs / "b_chest.png")
    assert code != 0 and "other.pt" in err


def test_console_script_runs_for_real(inputs: Path, models: dict[str, Path]) -> None:
    """The installed ``cxr-triage`` entry point, in a fresh process."""
    script = shutil.which("cxr-triage") or str(Path(sys.executable).with_name("cxr-triage"))
    proc = subprocess.run(
        [
            script,
            "classify",
            "--no-gate",
            "--json",
            "--model",
            str(models["beta"]),
            str(inputs / "a_real_cr.dcm"),
            str(inputs / "c_chest.jpg"),
            str(inputs / "f_notes.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok", "rejected"]
    assert all(r["model_version"] == "beta" for r in records)
