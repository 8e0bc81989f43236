"""A windowing change must not make a chest radiograph atypical: the typicality gate under other renderings.

``--images`` validation images of the pack (seeded, default 300; the sample ``bench/gate_eval.py --max-chest`` would
draw from that split) are scored by the gate as they are and rendered again from their 8-bit pixels on [0, 1]:

- a window twice as wide (``0.25 + 0.5 x``: half the contrast);
- gamma 0.8 and gamma 1.25 (``x ** g``);
- a 2nd-98th percentile window (each image's own 2 % and 98 % quantiles stretched to 0 and 1, clipped).

Per rendering it prints how many images the gate refuses, how many of them it did not refuse as they are ("newly
refused", the figure the requirement is about), how many it no longer refuses, and the same for the pixel view
check (``cxr_triage.ml.symmetry``) and for either. ``--timing N`` also times the gate on N images one at a time
(batch 1, CPU milliseconds per image, after a warm-up)::

    python bench/gate_rendering.py --pack packs/cxr-full.pack [--gate FILE] [--images 300] [--timing 50] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_triage.ml import symmetry  # noqa: E402
from cxr_triage.ml.gate import TypicalityGate, load_gate  # noqa: E402
from cxr_triage.ml.imaging import to_model_batch  # noqa: E402


def percentile_window(x: torch.Tensor, low: float = 0.02, high: float = 0.98) -> torch.Tensor:
    """(N, H, W) images in [0, 1]: each image's ``low`` and ``high`` quantiles stretched to 0 and 1, clipped."""
    q = torch.quantile(x.flatten(1).double(), torch.tensor([low, high], dtype=torch.float64), dim=1).float()
    lo, hi = q[0][:, None, None], q[1][:, None, None]
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)


RENDERINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "as they are": lambda x: x,
    "window twice as wide": lambda x: 0.25 + 0.5 * x,
    "gamma 0.8": lambda x: x.pow(0.8),
    "gamma 1.25": lambda x: x.pow(1.25),
    "2nd-98th percentile window": percentile_window,
}


def validation_images(pack: Path, count: int, seed: int) -> torch.Tensor:
    """(count, 224, 224) float images in [0, 1]: a seeded sample of the pack's validation split."""
    from training.pack import decode_pack, load_pack

    data = decode_pack(load_pack(pack))
    idx = data.indices("val")
    if idx.numel() > count:
        idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))[:count]]
    return data.images[idx].float() / 255.0


def verdicts(gate: TypicalityGate, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: refused by the gate, refused by the pixel view check (bool tensors)."""
    scores, sym = [], []
    for start in range(0, images.shape[0], batch_size):
        batch = to_model_batch(images[start : start + batch_size, None])
        scores.append(gate.combine(gate.block_scores(batch)))
        sym.append(symmetry.symmetry_scores(batch))
    gate_refuses = torch.tensor([gate.refuses(float(s)) for s in torch.cat(scores)])
    return gate_refuses, ~(torch.cat(sym) >= symmetry.THRESHOLD)


def rendering_rows(gate: TypicalityGate, images: torch.Tensor) -> dict[str, dict[str, int]]:
    """Per rendering: refused, newly refused and no longer refused against the images as they are."""
    rows: dict[str, dict[str, int]] = {}
    base: dict[str, torch.Tensor] = {}
    for name, render in RENDERINGS.items():
        by_gate, by_view = verdicts(gate, render(images).clamp(0.0, 1.0))
        now = {"gate": by_gate, "view": by_view, "either": by_gate | by_view}
        base = base or now
        row = {"images": int(images.shape[0])}
        for rule, refused in now.items():
            row[f"{rule}_refused"] = int(refused.sum())
            row[f"{rule}_newly_refused"] = int((refused & ~base[rule]).sum())
            row[f"{rule}_no_longer_refused"] = int((~refused & base[rule]).sum())
        rows[name] = row
    return rows


def timing(gate: TypicalityGate, images: torch.Tensor, count: int) -> dict[str, Any]:
    """Milliseconds to score one image (batch 1; model input already prepared), after two warm-up images."""
    inputs = to_model_batch(images[: count + 2, None])
    times = []
    for i in range(inputs.shape[0]):
        started = time.perf_counter()
        gate.scores(inputs[i : i + 1])
        if i >= 2:
            times.append(1000 * (time.perf_counter() - started))
    return {
        "images": len(times),
        "median_ms": round(statistics.median(times), 1),
        "mean_ms": round(statistics.fmean(times), 1),
        "threads": torch.get_num_threads(),
    }


def print_rows(rows: dict[str, dict[str, int]]) -> None:
    print(f"\n{'rendering':<28} {'images':>6} | {'gate: refused':>13} {'new':>4} {'gone':>5} |"
          f" {'view: refused':>13} {'new':>4} | {'either: refused':>15} {'new':>4}")  # fmt: skip
    for name, r in rows.items():
        print(
            f"{name:<28} {r['images']:>6} | {r['gate_refused']:>13} {r['gate_newly_refused']:>4}"
            f" {r['gate_no_longer_refused']:>5} | {r['view_refused']:>13} {r['view_newly_refused']:>4} |"
            f" {r['either_refused']:>15} {r['either_newly_refused']:>4}"
        )


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pack", type=Path, required=True, help="the classifier's pack (its validation split)")
    parser.add_argument("--gate", type=Path, default=None, help="gate file (default: the bundled one)")
    parser.add_argument("--false-refusal-rate", type=float, default=0.01, help="the gate's setting")
    parser.add_argument("--images", type=int, default=300, help="validation images (seeded sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sample")
    parser.add_argument("--timing", type=int, default=0, help="also time the gate on this many images, batch 1")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    opts = parser.parse_args(args)
    gate = load_gate(opts.gate, opts.false_refusal_rate)
    images = validation_images(opts.pack, opts.images, opts.seed)
    print(f"gate {gate.version} (sha256 {gate.sha256[:12]}), threshold {gate.threshold:.3f}; per-block thresholds "
          f"{ {b: round(t, 3) for b, t in gate.block_thresholds().items()} }")  # fmt: skip
    report: dict[str, Any] = {"gate": gate.version, "sha256": gate.sha256, "renderings": rendering_rows(gate, images)}
    print_rows(report["renderings"])
    if opts.timing:
        report["timing"] = timing(gate, images, opts.timing)
        print(f"\nscoring one image at a time: {json.dumps(report['timing'])}")
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
