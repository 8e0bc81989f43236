"""The same radiograph rendered several ways: how much does the model's answer move?

Hospitals' modalities window, gamma-correct and scale the same anatomy differently. This bench takes validation
images of the shared data (the group-aware split every training command uses, so no image here was trained on),
writes each one as DICOM in several renderings and runs every file through the product's own pixel pipeline
(``prepare_dataset``: VOI window, scaling, resize) and the classifier:

- ``reference``: 12 bits stored, a window over the full range (the same picture as the 8-bit source);
- ``window x2``: the same stored values, a window twice as wide (flatter contrast);
- ``percentile``: a window from the 2nd to the 98th percentile of the stored values (clips both tails);
- ``gamma 0.8`` / ``gamma 1.25``: stored values through a gamma curve, full window;
- ``8-bit``: 8 bits stored, no window.

It prints, per rendering, the accuracy and the median / 90th percentile of the largest change of any class
probability against the reference; and over all renderings together, per image, the spread (largest minus
smallest probability of any class): its median and 90th percentile are the figures the model issue targets
(<= 0.02 and <= 0.05), with accuracy under every rendering within 2 points of the reference::

    python bench/rendering.py --manifest ../shared/data/cxr/labels.csv [--model PATH] [--per-class 20]

Name the machine with the figures: the model runs in the precision ``[model] precision = auto`` picks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_triage.ml.checkpoint import load_classifier, resolve_model_path  # noqa: E402
from cxr_triage.ml.inference import Predictor  # noqa: E402
from cxr_triage.ml.preprocess import PreparedImage, prepare_dataset  # noqa: E402
from cxr_triage.testing.synthetic import new_dataset  # noqa: E402
from training.data import read_manifest, split_records  # noqa: E402
from training.engine import cpu_model_name  # noqa: E402

FULL_WINDOW = (2047.5, 4096.0)


def _twelve(stored: np.ndarray, center: float, width: float) -> Dataset:
    return new_dataset(stored.astype(np.uint16), bits_stored=12, WindowCenter=center, WindowWidth=width)


def _gamma(unit: np.ndarray, gamma: float) -> Dataset:
    return _twelve(np.round(4095 * unit**gamma), *FULL_WINDOW)


def _percentile(unit: np.ndarray) -> Dataset:
    stored = np.round(unit * 4095)
    lo, hi = np.percentile(stored, [2, 98])
    return _twelve(stored, (lo + hi) / 2, max(hi - lo, 2.0))


RENDERINGS: dict[str, Callable[[np.ndarray, np.ndarray], Dataset]] = {
    "reference": lambda unit, v8: _twelve(np.round(unit * 4095), *FULL_WINDOW),
    "window x2": lambda unit, v8: _twelve(np.round(unit * 4095), FULL_WINDOW[0], 2 * FULL_WINDOW[1]),
    "percentile": lambda unit, v8: _percentile(unit),
    "gamma 0.8": lambda unit, v8: _gamma(unit, 0.8),
    "gamma 1.25": lambda unit, v8: _gamma(unit, 1.25),
    "8-bit": lambda unit, v8: new_dataset(v8, bits_stored=8),
}
"""Rendering name -> the DICOM dataset of an image given as [0, 1] floats and as its 8-bit source values."""


def validation_images(manifest: str, root: str | None, per_class: int, seed: int) -> list[tuple[Path, int]]:
    """``per_class`` images of each class from the validation split (split seed 0, as packs use), seeded."""
    m = read_manifest(manifest, root)
    split = split_records(m.records, seed=0)
    rng = np.random.default_rng(seed)
    chosen: list[tuple[Path, int]] = []
    for label in range(len(m.class_names)):
        pool = [r for r, s in zip(m.records, split, strict=True) if s == 1 and r.label == label]
        for i in rng.choice(len(pool), size=min(per_class, len(pool)), replace=False):
            chosen.append((pool[int(i)].path, label))
    return chosen


def rendered_inputs(path: Path) -> torch.Tensor:
    """(len(RENDERINGS), 3, 224, 224): the image in every rendering, through the product's pixel pipeline."""
    v8 = np.asarray(Image.open(path).convert("L"))
    unit = v8.astype(np.float64) / 255.0
    tensors = []
    for name, render in RENDERINGS.items():
        prepared = prepare_dataset(render(unit, v8))
        if not isinstance(prepared, PreparedImage):
            raise SystemExit(f"{path} ({name}) was refused: {prepared}")
        tensors.append(prepared.tensor)
    return torch.stack(tensors)


def summarise(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
    """Figures from (images, renderings, classes) probabilities and the labels."""
    names = list(RENDERINGS)
    rows = {}
    for r, name in enumerate(names):
        change = (probs[:, r] - probs[:, 0]).abs().amax(1)
        rows[name] = {
            "accuracy": float((probs[:, r].argmax(1) == labels).float().mean()),
            "change_median": float(change.median()),
            "change_p90": float(change.quantile(0.9)),
        }
    spread = (probs.amax(1) - probs.amin(1)).amax(1)
    worst = max(abs(rows[n]["accuracy"] - rows["reference"]["accuracy"]) for n in names)
    return {
        "renderings": rows,
        "spread_median": float(spread.median()),
        "spread_p90": float(spread.quantile(0.9)),
        "largest_accuracy_gap": worst,
        "images": int(labels.numel()),
    }


def _print(summary: dict[str, object], model: str, precision: str) -> None:
    print(f"model {model}, precision {precision}, {summary['images']} validation images, CPU {cpu_model_name()}")
    print(f"{'rendering':<12} {'accuracy':>9} {'change median':>14} {'change p90':>11}")
    for name, row in summary["renderings"].items():  # type: ignore[union-attr]
        print(f"{name:<12} {row['accuracy']:>9.1%} {row['change_median']:>14.4f} {row['change_p90']:>11.4f}")
    print(
        f"spread over all renderings: median {summary['spread_median']:.4f} (target <= 0.02), "
        f"90th percentile {summary['spread_p90']:.4f} (target <= 0.05); largest accuracy gap to the reference "
        f"{summary['largest_accuracy_gap']:.1%} (target <= 2 points)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, help="labels.csv of the shared data (or any manifest)")
    p.add_argument("--root", default=None, help="folder the manifest's paths are relative to (default: its folder)")
    p.add_argument("--model", default=None, help="classifier checkpoint (default: the bundled model)")
    p.add_argument("--per-class", type=int, default=20, help="validation images per class")
    p.add_argument("--seed", type=int, default=0, help="which validation images are drawn")
    p.add_argument("--precision", default="auto", help="auto, float32 or bfloat16 (as [model] precision)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    loaded = load_classifier(resolve_model_path(args.model, "pass it with --model PATH"))
    predictor = Predictor(loaded, "cpu", batch_size=len(RENDERINGS), precision=args.precision)
    images = validation_images(args.manifest, args.root, args.per_class, args.seed)
    probs = torch.stack([predictor.probabilities(rendered_inputs(path)) for path, _ in images])
    labels = torch.tensor([label for _, label in images])
    summary = summarise(probs, labels)
    summary.update(model=loaded.card.model_version, precision=predictor.precision, machine=cpu_model_name())
    _print(summary, loaded.card.model_version, predictor.precision)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
