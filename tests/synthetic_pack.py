"""Tiny synthetic training data for tests of training and retraining: chest phantoms whose brightness says their
class, written as PNGs with a manifest and packed by ``python -m training pack``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_triage import CLASS_NAMES
from cxr_triage.testing.synthetic import phantom


def synthetic_image(label: int, seed: int) -> np.ndarray:
    """A 224x224 uint8 chest phantom whose brightness says its class (covid darkest, pneumonia brightest)."""
    rng = np.random.default_rng(seed)
    image = phantom(224, 224) * (0.6 + 0.2 * label) + rng.normal(0.0, 0.03, (224, 224))
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def write_synthetic_pack(folder: Path, name: str, group_prefix: str, count: int = 90) -> Path:
    """``count`` phantoms (classes in turn, one group each) as ``folder/name/*.png``, their manifest
    ``folder/name.csv`` and its pack ``folder/name.pack``, which is returned."""
    from training import cli

    rows = []
    for i in range(count):
        path = folder / name / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(synthetic_image(i % 3, seed=i)).save(path)
        rows.append({"path": str(path), "label": CLASS_NAMES[i % 3], "group": f"{group_prefix}{i}"})
    with open(folder / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    pack = folder / f"{name}.pack"
    argv = ["pack", "--manifest", str(folder / f"{name}.csv"), "--root", "/", "--out", str(pack), "--max-mib", "4"]
    assert cli.main([*argv, "--no-progress", "--log-level", "WARNING"]) == 0
    return pack
