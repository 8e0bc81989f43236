"""The model issue's benchmark scripts run and print every figure they promise (tiny sizes; no figure is checked
against a target: the figures belong to the scripts' own output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_bench import run_bench

SHARED_LABELS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr" / "labels.csv"


def test_rendering_bench_prints_each_rendering_and_the_spread(tmp_path: Path) -> None:
    out = run_bench(
        "rendering.py", "--manifest", str(SHARED_LABELS), "--per-class", "1", "--json", str(tmp_path / "r.json")
    )
    for name in ("reference", "window x2", "percentile", "gamma 0.8", "gamma 1.25", "8-bit"):
        assert any(line.startswith(name) and "%" in line for line in out.splitlines()), out
    assert "spread over all renderings: median " in out and "largest accuracy gap" in out
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["images"] == 3 and set(figures["renderings"]) >= {"reference", "8-bit"}
    assert figures["renderings"]["reference"]["change_p90"] == 0.0
    assert 0.0 <= figures["spread_median"] <= figures["spread_p90"] <= 1.0


def test_train_compute_bench_prints_a_row_per_configuration_and_the_fastest() -> None:
    out = run_bench(
        "train_compute.py",
        *("--width", "4", "--size", "64", "--seconds", "0.2", "--batches", "2", "4", "--threads", "1", "--no-compile"),
    )
    assert out.startswith("CPU: ") and "GFLOP per image per training step" in out
    rows = [line for line in out.splitlines() if line.split()[:1] in (["float32"], ["bfloat16"])]
    assert len(rows) >= 2 * 3  # per workload: the base, contiguous memory, the other batch (and float32 with bf16)
    assert all(line.rstrip().endswith("%") for line in rows)
    assert out.count("fastest for ") == 2


def test_calibration_reports_ece_per_source() -> None:
    from training.calibrate import ece_per_source, expected_calibration_error

    torch.manual_seed(0)
    labels = torch.randint(0, 3, (60,))
    logits = torch.nn.functional.one_hot(labels, 3).float() * 4.0  # confident and right...
    logits[40:] = torch.nn.functional.one_hot((labels[40:] + 1) % 3, 3).float() * 4.0  # ...but source b is wrong
    sources = torch.tensor([0] * 40 + [1] * 20)
    table = ece_per_source(logits, labels, sources, ("a", "b", "unused"), temperature=2.0)
    assert set(table) == {"a", "b"} and table["a"]["images"] == 40 and table["b"]["images"] == 20
    assert table["a"]["accuracy"] == 1.0 and table["b"]["accuracy"] == 0.0
    probs_b = torch.softmax(logits[40:], 1)
    assert table["b"]["ece_before"] == pytest.approx(expected_calibration_error(probs_b, labels[40:]))
    assert table["b"]["ece_before"] > 0.9 and table["b"]["ece_after"] < table["b"]["ece_before"]


def test_vector_scaling_is_fitted_on_validation_and_compared_per_source() -> None:
    from training.calibrate import compare_calibrators, fit_vector_scaling

    torch.manual_seed(0)
    labels = torch.randint(0, 3, (300,))
    logits = torch.nn.functional.one_hot(labels, 3).float() * 3.0 + torch.randn(300, 3)
    logits[:, 0] += 1.5  # a class bias that one temperature cannot remove
    scale, bias = fit_vector_scaling(logits, labels)
    assert scale.shape == bias.shape == (3,) and bool((scale > 0).all())
    assert float(bias[0] - bias[1:].mean()) < -0.5  # the bias is learnt back
    sources = torch.tensor([0, 1] * 150)
    table = compare_calibrators((logits, labels, sources), (logits, labels, sources), ("a", "b"))
    assert set(table) == {"parameters", "none", "temperature", "vector"}
    for method in ("none", "temperature", "vector"):
        assert set(table[method]["test"]["per_source"]) == {"a", "b"}
    assert table["vector"]["val"]["nll"] < table["temperature"]["val"]["nll"] <= table["none"]["val"]["nll"] + 1e-6
