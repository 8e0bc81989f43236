"""Temperature scaling for a trained classifier: ``python -m training.calibrate``.

The temperature T minimises the negative log-likelihood of ``softmax(logits / T)`` on the validation split (one
parameter, so the classifier's ranking and accuracy are unchanged). Expected calibration error (15 equal-width
bins of the top probability) and NLL are measured on the test split before and after, overall and per source data
set (a temperature fitted on the mix may not carry to each source), and a reliability diagram is drawn. The
calibrated checkpoint has the same weights with the temperature stored in it (``ModelCard.temperature``) and
``-cal`` appended to its version.

Vector scaling (a scale and a bias per class, ``softmax(logits * scale + bias)``, also fitted on the validation
split) is measured beside it, on both splits, overall and per source (``calibrators`` in the report;
``--report-only`` writes no checkpoint). It is reported, not shipped: the runtime applies a temperature only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cxr_triage.ml.checkpoint import load_classifier, save_classifier
from cxr_triage.ml.imaging import to_model_batch, uint8_to_unit
from training.pack import decode_pack, load_pack

ECE_BINS = 15


@torch.no_grad()  # not inference_mode: the temperature fit differentiates through these logits
def logits_of(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, C) float32 logits of (N, 224, 224) uint8 images."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = to_model_batch(uint8_to_unit(images[start : start + batch_size])[:, None])
        out.append(model(x).float())
    return torch.cat(out)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of ``labels`` (LBFGS on log T)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp())


def fit_vector_scaling(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class scale (positive: fitted as its logarithm) and bias minimising the NLL of ``labels`` (LBFGS)."""
    log_scale = torch.zeros(logits.shape[1], requires_grad=True)
    bias = torch.zeros(logits.shape[1], requires_grad=True)
    optimiser = torch.optim.LBFGS([log_scale, bias], lr=0.1, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits * log_scale.exp() + bias, labels)
        loss.backward()
        return loss

    optimiser.step(closure)
    return log_scale.detach().exp(), bias.detach()


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per bin of the top probability: count, mean confidence, accuracy."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        n = int(inside.sum())
        rows.append(
            {
                "low": float(lo),
                "high": float(hi),
                "count": n,
                "confidence": float(confidence[inside].mean()) if n else 0.0,
                "accuracy": float(correct[inside].mean()) if n else 0.0,
            }
        )
    return rows


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    total = probs.shape[0]
    return sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in calibration_bins(probs, labels, bins))


def scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, Any]:
    probs = torch.softmax(logits / temperature, 1)
    return {
        "ece": expected_calibration_error(probs, labels),
        "nll": float(torch.nn.functional.cross_entropy(logits / temperature, labels)),
        "accuracy": float((probs.argmax(1) == labels).float().mean()),
        "bins": calibration_bins(probs, labels),
    }


def ece_per_source(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sources: torch.Tensor,
    names: Sequence[str],
    temperature: float,
) -> dict[str, dict[str, float]]:
    """Per source data set: images, accuracy, and ECE before (T = 1) and after the temperature."""
    out = {}
    for index, name in enumerate(names):
        keep = sources == index
        n = int(keep.sum())
        if n == 0:
            continue
        before, after = scores(logits[keep], labels[keep], 1.0), scores(logits[keep], labels[keep], temperature)
        out[name or "unnamed"] = {
            "images": n,
            "accuracy": float((logits[keep].argmax(1) == labels[keep]).float().mean()),
            "ece_before": before["ece"],
            "ece_after": after["ece"],
        }
    return out


def _summary(probs: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor, names: Sequence[str]) -> dict:
    """Overall ECE, NLL and accuracy of calibrated ``probs``, and ECE and accuracy per source."""
    out: dict[str, Any] = {
        "ece": expected_calibration_error(probs, labels),
        "nll": float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels)),
        "accuracy": float((probs.argmax(1) == labels).float().mean()),
        "per_source": {},
    }
    for index, name in enumerate(names):
        keep = sources == index
        if int(keep.sum()):
            out["per_source"][name or "unnamed"] = {
                "images": int(keep.sum()),
                "ece": expected_calibration_error(probs[keep], labels[keep]),
                "accuracy": float((probs[keep].argmax(1) == labels[keep]).float().mean()),
            }
    return out


def compare_calibrators(
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    names: Sequence[str],
) -> dict[str, Any]:
    """None, temperature and vector scaling, each fitted on ``val`` (logits, labels, sources), measured on both."""
    temperature = fit_temperature(val[0], val[1])
    scale, bias = fit_vector_scaling(val[0], val[1])
    methods = {
        "none": lambda z: z,
        "temperature": lambda z: z / temperature,
        "vector": lambda z: z * scale + bias,
    }
    out: dict[str, Any] = {"parameters": {"temperature": temperature, "scale": scale.tolist(), "bias": bias.tolist()}}
    for method, apply in methods.items():
        out[method] = {
            "val": _summary(torch.softmax(apply(val[0]), 1), val[1], val[2], names),
            "test": _summary(torch.softmax(apply(test[0]), 1), test[1], test[2], names),
        }
    return out


def print_comparison(comparison: dict[str, Any]) -> None:
    """One line per calibrator and split: overall ECE and accuracy, then each source's ECE."""
    for method in ("none", "temperature", "vector"):
        for split in ("val", "test"):
            row = comparison[method][split]
            sources = ", ".join(f"{k} {100 * v['ece']:.1f}" for k, v in row["per_source"].items())
            overall = f"ECE {100 * row['ece']:.2f} % accuracy {100 * row['accuracy']:.2f} %"
            print(f"{method:<12} {split:<5} {overall} | {sources}")


def reliability_diagram(before: dict[str, Any], after: dict[str, Any], temperature: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, result, title in ((axes[0], before, "before (T = 1)"), (axes[1], after, f"after (T = {temperature:.3f})")):
        used = [b for b in result["bins"] if b["count"]]
        centres = [(b["low"] + b["high"]) / 2 for b in used]
        ax.bar(
            centres, [b["accuracy"] for b in used], width=1 / ECE_BINS, edgecolor="black", alpha=0.7, label="accuracy"
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.plot(centres, [b["confidence"] for b in used], "r.", label="mean confidence")
        ax.set_title(f"{title}: ECE {100 * result['ece']:.2f} %, NLL {result['nll']:.3f}")
        ax.set_xlabel("top probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy on the test split")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Reliability of the shipped classifier, test split (15 bins)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_classifier(args.model)
    data = decode_pack(load_pack(args.pack))
    val, test = data.indices("val"), data.indices("test")
    val_logits, test_logits = logits_of(loaded.model, data.images[val]), logits_of(loaded.model, data.images[test])
    temperature = fit_temperature(val_logits, data.labels[val])
    before, after = scores(test_logits, data.labels[test], 1.0), scores(test_logits, data.labels[test], temperature)
    assert data.sources is not None
    sources = ece_per_source(test_logits, data.labels[test], data.sources[test], data.source_names, temperature)
    comparison = compare_calibrators(
        (val_logits, data.labels[val], data.sources[val]),
        (test_logits, data.labels[test], data.sources[test]),
        data.source_names,
    )
    print_comparison(comparison)
    if args.report_only:
        return {"temperature": temperature, "test_per_source": sources, "calibrators": comparison}
    if args.plot:
        reliability_diagram(before, after, temperature, args.plot)
    card = dataclasses.replace(
        loaded.card,
        model_version=loaded.card.model_version + "-cal",
        temperature=temperature,
        provenance={
            **loaded.card.provenance,
            "calibration": {
                "method": "temperature scaling on the validation split (NLL, LBFGS)",
                "temperature": temperature,
                "uncalibrated_sha256": loaded.sha256,
                "test_before": {k: v for k, v in before.items() if k != "bins"},
                "test_after": {k: v for k, v in after.items() if k != "bins"},
                "test_per_source": sources,
            },
        },
    )
    digest = save_classifier(args.out, loaded.model, card)
    return {
        "out": str(args.out),
        "sha256": digest,
        "temperature": temperature,
        "test_before": {k: v for k, v in before.items() if k != "bins"},
        "test_after": {k: v for k, v in after.items() if k != "bins"},
        "test_per_source": sources,
        "calibrators": comparison,
        "val_images": int(val.numel()),
        "test_images": int(test.numel()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="classifier checkpoint to calibrate")
    parser.add_argument("--pack", required=True, help="the pack the classifier was trained on (same split)")
    parser.add_argument("--out", type=Path, default=None, help="calibrated checkpoint to write")
    parser.add_argument("--report-only", action="store_true", help="measure the calibrators, write nothing")
    parser.add_argument("--plot", type=Path, default=None, help="reliability diagram PNG to write")
    return parser


def main(args: Sequence[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(args)
    if opts.out is None and not opts.report_only:
        parser.error("--out is required unless --report-only")
    print(json.dumps(run(opts), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
