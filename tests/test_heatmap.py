"""The Grad-CAM heatmap (cxr_triage.ml.heatmap): geometry, and the sanity checks of Adebayo et al. (2018) on real
radiographs with the shipped model. The bounds are the figures measured when the tests were written (docs/HEATMAP.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch
from scipy.stats import spearmanr

from cxr_triage import BUNDLED_MODEL
from cxr_triage.core.config import ConfigError
from cxr_triage.core.settings import load_settings
from cxr_triage.ml.checkpoint import LoadedModel, load_classifier
from cxr_triage.ml.heatmap import GradCAMHeatmap, upsample
from cxr_triage.ml.model import CAEClassifier, ModelSpec
from cxr_triage.ml.preprocess import PreparedImage, prepare_path

pytestmark = pytest.mark.xdist_group("heatmap")  # one worker: the bundled model and images loaded once

SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
FILES = ("fo-dicom_CR-MONO1-10-chest.dcm", "nih-cxr14-dx-no-finding.dcm", "pydicom-data_RG1_UNCR.dcm")
"""The three distinct real radiographs (the other two shared files are RG1_UNCR compressed)."""

RANDOM_RHO_MAX = 0.5
"""Spearman correlation of a randomised model's map with the trained one's: measured -0.60 to 0.42 (seeds 0-2)."""

FLIP_RHO_MIN = 0.2
"""Spearman correlation of the flipped image's map, flipped back, with the map: measured 0.28 to 0.56."""


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_classifier(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    prepared = [prepare_path(SHARED_DICOM / name) for name in FILES]
    assert all(isinstance(p, PreparedImage) for p in prepared)
    return torch.stack([p.tensor for p in prepared])  # type: ignore[union-attr]


def rho(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy())[0])


def test_maps_have_each_images_own_geometry(loaded: LoadedModel, images: torch.Tensor) -> None:
    sizes = []
    for name in FILES:
        ds = pydicom.dcmread(SHARED_DICOM / name, stop_before_pixels=True, force=True)
        sizes.append((int(ds.Rows), int(ds.Columns)))
    assert (1955, 1841) in sizes  # not square: the squash to 224x224 is undone
    maps = GradCAMHeatmap(loaded.model).build(images, sizes)
    for heat, size in zip(maps, sizes, strict=True):
        assert tuple(heat.shape) == size and heat.dtype == torch.float32
        assert float(heat.min()) >= 0.0 and float(heat.max()) == pytest.approx(1.0)


def test_the_map_explains_the_predicted_class(loaded: LoadedModel, images: torch.Tensor) -> None:
    coarse = GradCAMHeatmap(loaded.model).coarse(images)
    assert tuple(coarse.maps.shape) == (len(FILES), 14, 14)
    expected = loaded.model.eval()(images).argmax(1)
    assert coarse.classes.tolist() == expected.tolist()
    assert all(float(m.max()) > 0 for m in coarse.maps)


def test_upsampling_is_flip_equivariant_and_scaled() -> None:
    coarse = torch.rand(14, 14)
    full = upsample(coarse, (300, 211))
    assert tuple(full.shape) == (300, 211) and float(full.max()) == pytest.approx(1.0)
    assert torch.allclose(upsample(torch.flip(coarse, [1]), (300, 211)), torch.flip(full, [1]), atol=1e-6)
    assert torch.equal(upsample(torch.zeros(14, 14), (5, 7)), torch.zeros(5, 7))


def test_a_randomised_models_map_differs_from_the_trained_models(loaded: LoadedModel, images: torch.Tensor) -> None:
    trained = GradCAMHeatmap(loaded.model).coarse(images)
    for seed in range(3):
        torch.manual_seed(seed)
        randomised = GradCAMHeatmap(CAEClassifier(loaded.model.spec)).coarse(images, trained.classes.tolist())
        for ours, theirs in zip(trained.maps, randomised.maps, strict=True):
            # a constant (all-zero) map of the randomised model differs from the trained model's by definition
            assert float(theirs.std()) == 0.0 or rho(ours, theirs) < RANDOM_RHO_MAX


def test_the_map_of_a_flipped_image_is_roughly_the_flipped_map(loaded: LoadedModel, images: torch.Tensor) -> None:
    """The map follows the image only as far as the model does: the LSTM head reads the 7x7 positions in row-major
    order and the training did not flip, so the model is not flip-invariant (it changes its class on 4 of the 5
    shared files when they are flipped) and the agreement is partial. The class is held fixed here."""
    heatmap = GradCAMHeatmap(loaded.model)
    original = heatmap.coarse(images)
    flipped = heatmap.coarse(torch.flip(images, [3]), original.classes.tolist())
    for ours, theirs in zip(original.maps, flipped.maps, strict=True):
        assert rho(ours, torch.flip(theirs, [1])) > FLIP_RHO_MIN


def test_the_map_is_float32_and_leaves_the_model_alone(loaded: LoadedModel, images: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coarse = GradCAMHeatmap(loaded.model).coarse(images[:1])
    assert coarse.maps.dtype == torch.float32
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_device_and_cpu_maps_agree(loaded: LoadedModel, images: torch.Tensor) -> None:
    """On a GPU host CUDA against the CPU; on a CPU-only host this only checks that an explicit device is used."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = GradCAMHeatmap(loaded.model).coarse(images)
    cuda = GradCAMHeatmap(loaded.model, device=device).coarse(images)
    assert cuda.classes.tolist() == cpu.classes.tolist()
    assert torch.allclose(cuda.maps, cpu.maps, rtol=1e-2, atol=1e-3 * float(cpu.maps.max()))


def test_construction_is_validated(loaded: LoadedModel, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="unknown heatmap method"):
        GradCAMHeatmap(loaded.model, method="occlusion")
    with pytest.raises(TypeError):
        GradCAMHeatmap(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    heatmap = GradCAMHeatmap(CAEClassifier(ModelSpec(width=4)))
    with pytest.raises(ValueError, match="expected"):
        heatmap.coarse(images[:, :, :112, :112])
    with pytest.raises(ValueError, match="sizes"):
        heatmap.build(images, [(10, 10)])
    with pytest.raises(ValueError, match="out of range"):
        heatmap.coarse(images[:1], [7])


def test_the_bench_reports_both_costs_and_the_machine() -> None:
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / "bench" / "heatmap.py"), "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    for line in ("machine:", "load average", "without heatmap:", "with heatmap:", "one pass for both", "PACS object"):
        assert line in out


def test_heatmap_settings(tmp_path: Path) -> None:
    settings = load_settings(None, environ={})
    assert settings.heatmap.enabled is True and settings.heatmap.method == "gradcam"
    site = tmp_path / "site.toml"
    site.write_text('[heatmap]\nmethod = "occlusion"\n')
    with pytest.raises(ConfigError, match=r"\[heatmap\] method"):
        load_settings(site, environ={})
