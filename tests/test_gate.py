"""The typicality gate: its statistics, its file, its threshold, and its verdicts in ``classify`` and the worker.

Unit tests fit tiny gates (width 4) on synthetic images; the shipped gate is checked on the shared real chest
DICOMs (they pass) and on images that are not chest radiographs (they are refused).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cxr_triage.files import file_sha256
from cxr_triage.ml.gate import (
    BUNDLED_GATE,
    REFUSAL_CODE,
    Autoencoder,
    GateError,
    GaussianModel,
    TypicalityGate,
    ledoit_wolf,
    load_gate,
    save_gate,
)
from cxr_triage.ml.imaging import to_model_input
from cxr_triage.ml.model import ConvAutoencoder
from cxr_triage.ml.preprocess import PreparedImage, prepare_path
from training.autoencoder import AutoencoderArtefact, load_autoencoder, save_autoencoder, split_state
from training.data import ImageSet
from training.gate import fit_gate, model_inputs

pytestmark = pytest.mark.xdist_group("gate")  # one worker: the fitted and shipped gates built once

SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


def blobs(n: int, seed: int) -> torch.Tensor:
    """(n, 224, 224) uint8 smooth 'radiograph-like' images: two dark ovals on a bright, noisy background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    out = []
    for _ in range(n):
        dx, dy, r = (torch.rand(3, generator=g) * 0.1).tolist()
        lungs = ((((xx + 0.45 + dx) / 0.3) ** 2 + ((yy + dy) / (0.6 + r)) ** 2) < 1) | (
            (((xx - 0.45 - dx) / 0.3) ** 2 + ((yy + dy) / (0.6 + r)) ** 2) < 1
        )
        image = 0.8 - 0.5 * lungs.float() + 0.03 * torch.randn(224, 224, generator=g)
        out.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(out)


@pytest.fixture(scope="module")
def tiny_gate() -> TypicalityGate:
    torch.manual_seed(0)
    network = Autoencoder(4)
    # 160 images: fewer leave the layout Gaussian (hundreds of dimensions) too unsure to separate noise from blobs
    return fit_gate(network, blobs(160, 1), blobs(40, 2), batch_size=32, rank=8, version="tiny-gate")


def test_ledoit_wolf_shrinks_a_noisy_covariance_towards_a_scaled_identity() -> None:
    z = torch.randn(50, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov, shrinkage = ledoit_wolf(z)
    assert 0.0 < shrinkage <= 1.0
    assert torch.allclose(cov, cov.T)
    assert float(torch.linalg.eigvalsh(cov).min()) > 0  # 50 samples of 40 dims: the raw covariance is near singular


def test_mahalanobis_distance_grows_with_distance_from_the_training_features() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(500, 20, generator=g) * torch.linspace(0.5, 3, 20)
    model = GaussianModel.fit(features, rank=8)
    inside = model.distance(features[:100]).mean()
    outside = model.distance(features[:100] + 6 * torch.linspace(0.5, 3, 20)).mean()
    assert 10 < float(inside) < 40  # about the dimension (20) for points of the fitted distribution
    assert float(outside) > 10 * float(inside)
    with pytest.raises(GateError):
        GaussianModel(torch.zeros(3), torch.ones(3), torch.zeros(3, 2), torch.ones(2), 0.0)


def test_threshold_is_the_validation_quantile_of_the_false_refusal_rate(tiny_gate: TypicalityGate) -> None:
    scores = tiny_gate.validation_scores
    for rate in (0.01, 0.05, 0.2):
        gate = TypicalityGate(
            tiny_gate.network, tiny_gate.gaussians, tiny_gate.scales, scores, rate, outlier=tiny_gate.outlier
        )
        refused = float((scores > gate.threshold).float().mean())
        step = 1.0 / scores.numel()  # the quantile interpolates between stored scores
        assert rate - step - 1e-9 <= refused <= rate + step + 1e-9
    with pytest.raises(GateError):
        TypicalityGate(tiny_gate.network, tiny_gate.gaussians, tiny_gate.scales, scores, 0.7, outlier=tiny_gate.outlier)
    with pytest.raises(GateError, match="scales for"):
        TypicalityGate(tiny_gate.network, tiny_gate.gaussians, tiny_gate.scales, scores)  # the outlier model is missing


def test_tiny_gate_refuses_noise_and_inverted_images_and_passes_its_own_kind(tiny_gate: TypicalityGate) -> None:
    typical = [to_model_input(x.float() / 255) for x in blobs(20, 3)]
    noise = [torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    inverted = [1.0 - x for x in typical[:5]]
    ok = tiny_gate.scores(typical)
    assert sum(tiny_gate.refuses(s) for s in ok) <= 2
    assert all(tiny_gate.refuses(s) for s in tiny_gate.scores(noise))
    assert all(tiny_gate.refuses(s) for s in tiny_gate.scores(inverted))
    score = tiny_gate.scores(noise[:1])[0]
    assert tiny_gate.reason(score) == f"not like a chest radiograph: typicality {score:.2f} > {tiny_gate.threshold:.2f}"
    assert tiny_gate.refuses(float("nan"))


def test_gate_file_round_trips_and_its_checksum_is_checked(tiny_gate: TypicalityGate, tmp_path: Path) -> None:
    path = tmp_path / "gate.pt"
    digest = save_gate(tiny_gate, path, {"note": "test"})
    assert (tmp_path / "gate.pt.sha256").read_text().split()[0] == digest
    loaded = load_gate(path, 0.05)
    assert loaded.sha256 == digest and loaded.version == "tiny-gate"
    images = [to_model_input(x.float() / 255) for x in blobs(4, 5)]
    # the fit scored with the weights and eigenvectors already rounded to the file's fp16: the loaded gate agrees
    assert np.allclose(loaded.scores(images), tiny_gate.scores(images), rtol=1e-3, atol=1e-3)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(GateError, match="does not match"):
        load_gate(path)
    (tmp_path / "other.pt").write_bytes(b"not a gate")
    with pytest.raises(GateError, match="not a typicality gate"):
        load_gate(tmp_path / "other.pt")


def per_block_gate(gate: TypicalityGate, quantiles: dict[str, float], rate: float = 0.01) -> TypicalityGate:
    """``gate`` with per-block thresholds from its own kind of images (a fresh validation set of blobs)."""
    validation = gate.block_scores([to_model_input(x.float() / 255) for x in blobs(60, 7)])
    return TypicalityGate(
        gate.network, gate.gaussians, gate.scales, gate.validation_scores, rate, "tiny-blocks",
        outlier=gate.outlier, validation_block_scores=validation, block_quantiles=quantiles,
    )  # fmt: skip


def test_per_block_thresholds_refuse_when_any_block_is_above_its_own(tiny_gate: TypicalityGate) -> None:
    quantiles = dict.fromkeys(tiny_gate.blocks, 0.95) | {"recon": 1.0}
    gate = per_block_gate(tiny_gate, quantiles)
    own = gate.block_thresholds()
    assert own["recon"] == float("inf") and all(0 < own[b] < float("inf") for b in gate.blocks if b != "recon")
    images = [to_model_input(x.float() / 255) for x in blobs(10, 8)]
    images += [torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    blocks = gate.block_scores(images)
    expected = [any(float(z) > own[b] for b, z in zip(gate.blocks, row, strict=True)) for row in blocks]
    assert [gate.refuses(s) for s in gate.scores(images)] == expected
    assert any(expected) and not all(expected)
    # a higher false-refusal setting lowers every block's own threshold
    looser = per_block_gate(tiny_gate, quantiles, rate=0.02).block_thresholds()
    assert all(looser[b] <= own[b] for b in gate.blocks if b != "recon")
    with pytest.raises(GateError, match="per-block thresholds need"):
        per_block_gate(tiny_gate, {"texture": 0.9})


def test_per_block_thresholds_survive_the_gate_file(tiny_gate: TypicalityGate, tmp_path: Path) -> None:
    gate = per_block_gate(tiny_gate, dict.fromkeys(tiny_gate.blocks, 0.9))
    save_gate(gate, tmp_path / "blocks.pt")
    loaded = load_gate(tmp_path / "blocks.pt")
    assert loaded.block_quantiles == gate.block_quantiles
    assert loaded.block_thresholds() == pytest.approx(gate.block_thresholds())
    save_gate(tiny_gate, tmp_path / "plain.pt")
    plain = load_gate(tmp_path / "plain.pt")
    assert plain.block_scale is None
    assert set(plain.block_thresholds().values()) == {plain.threshold}


def test_a_fitted_gate_stores_the_validation_block_scores(tiny_gate: TypicalityGate, tmp_path: Path) -> None:
    """``fit_gate`` keeps the validation split's block z-scores: the stored max-rule scores are their maxima, a gate
    file keeps them without block quantiles (the max rule), and with quantiles the gate decides per block."""
    blocks = tiny_gate.validation_block_scores
    assert blocks is not None and blocks.shape == (40, len(tiny_gate.blocks))
    assert torch.allclose(blocks.max(1).values.sort().values, tiny_gate.validation_scores, atol=1e-4)
    save_gate(tiny_gate, tmp_path / "plain.pt")
    plain = load_gate(tmp_path / "plain.pt")
    assert plain.block_scale is None and torch.equal(plain.validation_block_scores, blocks)
    quantiles = dict.fromkeys(tiny_gate.blocks, 0.95) | {"recon": 1.0}
    gate = fit_gate(Autoencoder(4), blobs(160, 1), blobs(40, 2), 32, rank=8, block_quantiles=quantiles)
    assert gate.block_quantiles == quantiles and gate.block_thresholds()["recon"] == float("inf")


# --- fitted from an autoencoder artefact (python -m training.gate --autoencoder) -------------------------------


@pytest.fixture(scope="module")
def blob_pack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImageSet]:
    """A (fake) pack path and the image set that ``training.gate`` decodes from it: blobs in three splits."""
    images = torch.cat([blobs(120, 11), blobs(30, 12), blobs(24, 13)])
    split = torch.tensor([0] * 120 + [1] * 30 + [2] * 24)
    sources = torch.arange(174) % 2
    data = ImageSet(images, torch.zeros(174, dtype=torch.int64), split, sources=sources, source_names=("a", "b"))
    path = tmp_path_factory.mktemp("blobpack") / "blobs.pack"
    path.write_bytes(b"decoded by the test's stand-in")
    return path, data


@pytest.fixture(scope="module")
def tiny_artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-4 autoencoder artefact with the equalising input, as ``training.pretrain`` writes one."""
    torch.manual_seed(3)
    encoder, decoder = split_state(ConvAutoencoder(4, "equalise").state_dict())
    history = [{"stretch": 0, "epoch": e, "size": 64, "val_mse": v} for e, v in ((1, 0.02), (2, 0.015))]
    path = tmp_path_factory.mktemp("artefact") / "ae-tiny.pt"
    save_autoencoder(path, AutoencoderArtefact(4, "equalise", encoder, decoder, 0.015, history, [{"stretch": 0}]))
    return path


def fit_from_artefact(
    monkeypatch: pytest.MonkeyPatch, blob_pack: tuple[Path, ImageSet], artefact: Path, out: Path, *extra: str
) -> dict[str, Any]:
    import training.gate as training_gate

    pack, data = blob_pack
    monkeypatch.setattr(training_gate, "load_pack", lambda path: {"path": path})
    monkeypatch.setattr(training_gate, "decode_pack", lambda packed: data)
    argv = ["--autoencoder", str(artefact), "--pack", str(pack), "--out", str(out), "--version", "tiny-ae", *extra]
    args = training_gate.build_parser().parse_args(argv)
    return training_gate.run(args)


def test_a_gate_from_an_autoencoder_artefact_uses_its_encoder_and_decoder_as_they_are(
    monkeypatch: pytest.MonkeyPatch, blob_pack: tuple[Path, ImageSet], tiny_artefact: Path, tmp_path: Path
) -> None:
    out, scores = tmp_path / "gate.pt", tmp_path / "scores.pt"
    extra = ("--block-quantiles", "1,0.95,0.95,0.95", "--scores", str(scores))
    summary = fit_from_artefact(monkeypatch, blob_pack, tiny_artefact, out, *extra)
    artefact, gate = load_autoencoder(tiny_artefact), load_gate(out)
    assert gate.version == "tiny-ae" and gate.network.width == 4 and gate.network.encoder.input_norm == "equalise"
    for part in ("encoder", "decoder"):  # no decoder training: the artefact's fp16 weights, unchanged
        state = getattr(gate.network, part).state_dict()
        assert all(torch.equal(state[k], v) for k, v in getattr(artefact, part).items()), part
    provenance = torch.load(out, weights_only=True)["provenance"]
    assert provenance["autoencoder"] == "ae-tiny.pt" and provenance["autoencoder_sha256"] == file_sha256(tiny_artefact)
    assert provenance["autoencoder_epochs"] == 2 and provenance["autoencoder_best_val_mse"] == 0.015
    assert provenance["decoder_history"] == [] and provenance["images"] == {"train": 120, "val": 30, "test": 24}
    assert summary["decoder_val_mse"] == 0.015 and summary["sha256"] == gate.sha256
    # the stored validation block scores are what the loaded gate computes, and decide per block
    _, data = blob_pack
    val = model_inputs(data.images[data.indices("val")])
    assert gate.validation_block_scores is not None and gate.validation_block_scores.shape == (30, 4)
    assert torch.allclose(gate.block_scores(val), gate.validation_block_scores, atol=1e-3)
    assert gate.block_quantiles == {"recon": 1.0, "texture": 0.95, "layout": 0.95, "outlier": 0.95}
    own = gate.block_thresholds()
    assert own["recon"] == float("inf") and all(0 < own[b] < float("inf") for b in ("texture", "layout", "outlier"))
    saved = torch.load(scores, weights_only=True)
    assert torch.equal(saved["val_blocks"], gate.validation_block_scores)
    assert saved["test_blocks"].shape == (24, 4) and saved["test_sources"].tolist() == data.sources[150:].tolist()


def test_without_block_quantiles_the_fitted_gate_keeps_the_block_scores_and_the_max_rule(
    monkeypatch: pytest.MonkeyPatch, blob_pack: tuple[Path, ImageSet], tiny_artefact: Path, tmp_path: Path
) -> None:
    extra = ("--limit", "25", "--train-images", "20")
    fit_from_artefact(monkeypatch, blob_pack, tiny_artefact, tmp_path / "gate.pt", *extra)
    gate = load_gate(tmp_path / "gate.pt")
    assert gate.block_scale is None and gate.validation_block_scores is not None
    assert gate.validation_block_scores.shape == (25, 4)
    assert set(gate.block_thresholds().values()) == {gate.threshold}
    provenance = torch.load(tmp_path / "gate.pt", weights_only=True)["provenance"]
    assert provenance["images"] == {"train": 20, "val": 25, "test": 24}


def test_the_gate_command_takes_one_network_and_four_block_quantiles(tiny_artefact: Path, tmp_path: Path) -> None:
    import argparse

    from training.gate import build_parser, parse_block_quantiles

    base = ["--pack", "p", "--out", str(tmp_path / "g.pt")]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--model", "m.pt", "--autoencoder", str(tiny_artefact)])
    with pytest.raises(SystemExit):
        build_parser().parse_args(base)
    assert parse_block_quantiles("1,0.999,0.9995,0.998") == {
        "recon": 1.0, "texture": 0.999, "layout": 0.9995, "outlier": 0.998,
    }  # fmt: skip
    for bad in ("0.99,0.99,0.99", "1,0.99,0.99,1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_block_quantiles(bad)


# --- the shipped gate ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_gate() -> TypicalityGate:
    return load_gate()


def shared_chest_tensors() -> list[torch.Tensor]:
    prepared = [prepare_path(p) for p in sorted(SHARED_DICOM.glob("*.dcm"))]
    tensors = [p.tensor for p in prepared if isinstance(p, PreparedImage)]
    assert len(tensors) == 5
    return tensors


def test_shipped_gate_is_small_and_checked(shipped_gate: TypicalityGate) -> None:
    assert BUNDLED_GATE.stat().st_size < 4 * 1024 * 1024
    assert shipped_gate.sha256 == Path(f"{BUNDLED_GATE}.sha256").read_text().split()[0]
    assert 0.5 < shipped_gate.threshold < 10


def test_shipped_gate_passes_the_real_chest_dicoms(shipped_gate: TypicalityGate) -> None:
    scores = shipped_gate.scores(shared_chest_tensors())
    assert not any(shipped_gate.refuses(s) for s in scores), scores


def test_shipped_gate_has_per_block_thresholds_without_the_reconstruction_error(shipped_gate: TypicalityGate) -> None:
    own = shipped_gate.block_thresholds()
    assert own["recon"] == float("inf")
    assert all(0 < own[b] < 20 for b in ("texture", "layout", "outlier"))


@pytest.mark.parametrize("render", [lambda x: 0.25 + 0.5 * x, lambda x: x**0.8, lambda x: x**1.25])
def test_shipped_gate_passes_the_real_chest_dicoms_under_another_window_or_gamma(  # noqa: ANN001
    shipped_gate: TypicalityGate, render
) -> None:
    scores = shipped_gate.scores([render(t) for t in shared_chest_tensors()])
    assert not any(shipped_gate.refuses(s) for s in scores), scores


def test_shipped_gate_refuses_inverted_rotated_blank_and_noise(shipped_gate: TypicalityGate) -> None:
    chest = shared_chest_tensors()
    altered = {
        "inverted": [1.0 - x for x in chest],
        "upside down": [torch.rot90(x, 2, (1, 2)) for x in chest],
        "blank": [torch.zeros(3, 224, 224), torch.ones(3, 224, 224), torch.full((3, 224, 224), 0.5)],
        "noise": [torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(3)],
    }
    for name, images in altered.items():
        scores = shipped_gate.scores(images)
        assert all(shipped_gate.refuses(s) for s in scores), (name, scores)


# --- in the product: classify and the worker -----------------------------------------------------------------


def run_classify(*argv: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "cxr_triage", "classify", "--json", "--device", "cpu", *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.slow
def test_classify_refuses_an_inverted_chest_and_reports_typicality(tmp_path: Path) -> None:
    import pydicom

    source = SHARED_DICOM / "nih-cxr14-dx-no-finding.dcm"  # DICOM Part 10, uncompressed, MONOCHROME2
    ds = pydicom.dcmread(source)
    ds.PhotometricInterpretation = (
        "MONOCHROME2" if ds.PhotometricInterpretation == "MONOCHROME1" else "MONOCHROME1"
    )  # the same pixels, displayed inverted
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence", "VOILUTFunction"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    inverted = tmp_path / "inverted.dcm"
    ds.save_as(inverted)
    records = {Path(r["path"]).name: r for r in run_classify(str(source), str(inverted))}
    assert records[source.name]["status"] == "ok"
    assert records[source.name]["typicality"] is not None
    refused = records["inverted.dcm"]
    assert refused["status"] == "rejected", refused
    assert refused["reason"].startswith("not like a chest radiograph: typicality ")
    assert refused["typicality"] > float(refused["reason"].rsplit("> ", 1)[1])
    unscreened = run_classify("--no-gate", str(inverted))
    assert unscreened[0]["status"] == "ok" and unscreened[0]["typicality"] is None


def test_worker_records_typicality_and_refuses_atypical_images(
    make_harness: Any, tiny_gate: TypicalityGate, tmp_path: Path
) -> None:
    from cxr_triage.core import db
    from cxr_triage.testing.synthetic import new_dataset

    gate_path = tmp_path / "tiny_gate.pt"
    save_gate(tiny_gate, gate_path)
    h = make_harness(gate={"enabled": True, "path": str(gate_path)})
    typical = new_dataset(blobs(1, 9)[0].numpy())
    noise = new_dataset(np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8))
    assert h.send([typical, noise]) == [0x0000, 0x0000]
    h.work()
    with h.sessions() as session:
        predictions = session.query(db.PredictionRecord).all()
        refusals = session.query(db.RefusalRecord).all()
    assert len(predictions) == 1 and predictions[0].typicality is not None
    assert not tiny_gate.refuses(predictions[0].typicality)
    assert [r.code for r in refusals] == [REFUSAL_CODE]
    assert refusals[0].typicality is not None and tiny_gate.refuses(refusals[0].typicality)
    assert refusals[0].reason == tiny_gate.reason(refusals[0].typicality)
    rows = {r["sop_instance_uid"]: r for r in h.rows()}
    assert rows[noise.SOPInstanceUID]["status"] == "rejected"
    assert rows[noise.SOPInstanceUID]["typicality"] == pytest.approx(refusals[0].typicality)
    assert rows[typical.SOPInstanceUID]["typicality"] == pytest.approx(predictions[0].typicality)


def test_scores_combine_the_block_scores(tiny_gate: TypicalityGate) -> None:
    images = [to_model_input(x.float() / 255) for x in blobs(3, 9)]
    blocks = tiny_gate.block_scores(images)
    assert tiny_gate.scores(images) == pytest.approx(tiny_gate.combine(blocks).tolist(), abs=1e-4)
    gate = per_block_gate(tiny_gate, dict.fromkeys(tiny_gate.blocks, 0.9))
    assert gate.scores(images) == pytest.approx((blocks * gate.block_scale).max(1).values.tolist(), abs=1e-4)
