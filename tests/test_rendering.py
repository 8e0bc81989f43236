"""The same answer however a hospital renders a radiograph: the equalise input normalisation.

A model that declares ``input_norm = "equalise"`` sees each image through a per-image histogram equalisation
(``cxr_triage.ml.imaging.equalise``). These tests pin what that buys on real radiographs, whatever the weights: the
five shared DICOM files and shared training-source images, rendered with another window, a percentile window,
gamma 0.8 and 1.25 and at 8 instead of 12 bits, reach the encoder as (nearly) the same input, through the product's
own pixel pipeline (``prepare_dataset``). It also pins the checkpoint contract: code that does not know a model's
normalisation refuses it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from cxr_triage.ml.checkpoint import CheckpointError, LoadedModel, ModelCard, load_classifier, save_classifier
from cxr_triage.ml.imaging import equalise, normalise, preprocessing_version
from cxr_triage.ml.inference import Predictor
from cxr_triage.ml.model import CAEClassifier, ModelSpec
from cxr_triage.ml.preprocess import PreparedImage, prepare_dataset, prepare_path
from cxr_triage.testing.synthetic import new_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_equalise_ignores_increasing_intensity_maps_and_is_idempotent() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 4096, (3, 1, 64, 64), generator=g).double() / 4095).expand(-1, 3, -1, -1)  # 12-bit
    e = equalise(x)
    assert e.shape == x.shape and float(e.min()) > 0.0 and float(e.max()) < 1.0
    for mapped in (x.pow(0.8), x.pow(1.25), 0.5 + (x - 0.5) / 2, torch.sigmoid(4 * (x - 0.3))):
        assert torch.allclose(equalise(mapped), e, atol=1e-6)
    assert torch.equal(equalise(e), e)
    assert torch.equal(normalise(x, "none"), x)
    with pytest.raises(ValueError, match="unknown input normalisation"):
        normalise(x, "zscore")


def test_tied_pixels_share_one_value() -> None:
    x = torch.zeros(1, 1, 4, 4)
    x[..., 2:, :] = 1.0  # half black, half white
    e = equalise(x)
    assert torch.equal(e[..., :2, :], torch.full((1, 1, 2, 4), 0.25))
    assert torch.equal(e[..., 2:, :], torch.full((1, 1, 2, 4), 0.75))


def _renderings(v8: np.ndarray) -> dict[str, pydicom.Dataset]:
    """One 8-bit picture as six DICOM renderings: 12-bit full window, window twice as wide, a 2nd-98th percentile
    window, gamma 0.8 and 1.25 (12-bit), and 8-bit without a window."""
    unit = v8.astype(np.float64) / 255.0
    s12 = np.round(unit * 4095).astype(np.uint16)
    lo, hi = np.percentile(s12, [2, 98])

    def twelve(stored: np.ndarray, center: float = 2047.5, width: float = 4096.0) -> pydicom.Dataset:
        return new_dataset(stored, bits_stored=12, WindowCenter=center, WindowWidth=width)

    return {
        "reference": twelve(s12),
        "window x2": twelve(s12, width=8192.0),
        "percentile 2-98": twelve(s12, (lo + hi) / 2, max(hi - lo, 2.0)),
        "gamma 0.8": twelve(np.round(4095 * unit**0.8).astype(np.uint16)),
        "gamma 1.25": twelve(np.round(4095 * unit**1.25).astype(np.uint16)),
        "8-bit": new_dataset(v8.astype(np.uint8), bits_stored=8),
    }


def _inputs(v8: np.ndarray) -> dict[str, torch.Tensor]:
    out = {}
    for name, ds in _renderings(v8).items():
        prepared = prepare_dataset(ds)
        assert isinstance(prepared, PreparedImage), prepared
        out[name] = prepared.tensor[None]
    return out


def _shared_images() -> list[np.ndarray]:
    """One image of each training source (the first of each in labels.csv) and the five shared DICOMs' pixels."""
    images, seen = [], set()
    with open(SHARED / "cxr" / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["source"] not in seen:
                seen.add(row["source"])
                images.append(np.asarray(Image.open(SHARED / "cxr" / row["path"]).convert("L")))
    for path in sorted((SHARED / "dicom").glob("*.dcm")):
        prepared = prepare_path(path)
        assert isinstance(prepared, PreparedImage), prepared
        images.append(np.round(prepared.tensor[0].numpy() * 255).astype(np.uint8))
    return images


def test_renderings_of_real_radiographs_reach_the_encoder_alike() -> None:
    images = _shared_images()
    assert len(images) == 11
    for v8 in images:
        inputs = _inputs(v8)
        raw_ref = inputs["reference"]
        ref = equalise(raw_ref)
        raw_gap = max(float((x - raw_ref).abs().mean()) for x in inputs.values())
        for name, x in inputs.items():
            diff = (equalise(x) - ref).abs()
            # clipping (percentile window) and quantisation tie a few pixels together (measured: mean <= 0.0005)
            assert float(diff.mean()) <= 0.002, (name, float(diff.mean()))
            assert float(diff.quantile(0.99)) <= 0.02, (name, float(diff.quantile(0.99)))
        assert raw_gap > 0.02  # without the normalisation the renderings differ visibly


def _spreads(input_norm: str, images: list[np.ndarray]) -> list[float]:
    """Per image: the largest change of any class probability across the six renderings, for fixed random weights."""
    torch.manual_seed(0)
    model = CAEClassifier(ModelSpec(width=8, dense_units=16, input_norm=input_norm)).eval()
    with torch.no_grad():  # a wider spread of logits than fresh weights give, so differences would show
        model.head[-1].weight.mul_(50.0)
    predictor = Predictor(LoadedModel(model, ModelCard(spec=model.spec), "0" * 64, None), "cpu", 8, "float32")
    spreads = []
    for v8 in images:
        probs = predictor.probabilities(torch.cat(list(_inputs(v8).values())))
        assert float(probs.max(1).values.min()) < 0.999  # not saturated: the comparison means something
        spreads.append(float((probs.max(0).values - probs.min(0).values).max()))
    return spreads


def test_an_equalising_model_gives_the_same_probabilities_across_renderings() -> None:
    images = _shared_images()
    equalised, plain = _spreads("equalise", images), _spreads("none", images)
    assert max(equalised) <= 0.005, equalised
    assert min(plain) > 2 * max(equalised) and max(plain) > 0.01, plain  # the same weights without it


def test_checkpoints_record_the_normalisation_and_code_that_lacks_it_refuses(tmp_path: Path) -> None:
    spec = ModelSpec(width=4, dense_units=8, input_norm="equalise")
    card = ModelCard(spec=spec, model_version="eq")
    assert card.preprocessing_version == preprocessing_version("equalise") == "cxr-pp/1+equalise"
    path = tmp_path / "m.pt"
    save_classifier(path, CAEClassifier(spec), card)
    loaded = load_classifier(path)
    assert loaded.card.spec.input_norm == "equalise" and loaded.model.encoder.input_norm == "equalise"
    payload = torch.load(path, weights_only=True)
    payload["preprocessing_version"] = "cxr-pp/1"  # what a model trained without the normalisation records
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"cxr-pp/1\+equalise"):
        load_classifier(path)


def test_the_trained_full_width_model_gives_the_same_answer_across_renderings() -> None:
    """The committed width-64 classifier (``training/weights/classifier-w64.pt``, input_norm ``equalise``), in
    float32 on the eleven real images: the bench (``bench/rendering.py``, 60 validation images) measured a 90th
    percentile spread of 0.009; the bound here is the issue's target for that figure, 0.05, and no answer flips."""
    path = Path(__file__).resolve().parents[1] / "training" / "weights" / "classifier-w64.pt"
    loaded = load_classifier(path)
    assert loaded.card.spec.width == 64 and loaded.card.spec.input_norm == "equalise"
    predictor = Predictor(loaded, "cpu", 6, "float32")
    spreads = []
    for v8 in _shared_images():
        probs = predictor.probabilities(torch.cat(list(_inputs(v8).values())))
        assert len(set(probs.argmax(1).tolist())) == 1, probs  # the same class under every rendering
        spreads.append(float((probs.max(0).values - probs.min(0).values).max()))
    assert max(spreads) <= 0.05, spreads
