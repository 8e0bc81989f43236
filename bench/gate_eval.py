"""How well the typicality gate separates chest radiographs from everything else: prints a table per category.

The non-chest set is assembled from what packages ship, so anyone can rebuild it:

- ``pydicom``: the images bundled with pydicom (``pydicom.data``: CT, MR, US, NM, secondary captures, ...),
  decoded with the product's own pixel steps where it can (else pydicom's ``pixel_array``, first frame, colour to
  grey, stretched to 0-1), duplicates (the same picture in another transfer syntax) counted once; chest CR/DX
  files would be left out (there are none);
- ``skimage``: scikit-image's bundled natural and microscopy images (a dev-only dependency);
- synthetic frames: uniform and Gaussian noise, black, white and mid-grey frames, gradients, a checkerboard;
- altered chest radiographs from the pack's test split: intensity-inverted, rotated by 90, 180 and 270 degrees,
  a central crop (the middle 35 %, so only part of the thorax) and a corner crop, each scaled back up.

Real chest radiographs: the pack's test split (never seen by the gate's fit), overall and per source, and the
five shared DICOM files through the whole product pipeline (``prepare_path``). Beside the gate, every row says
how many the pixel check for a lateral view (``cxr_triage.ml.symmetry``) refuses, and how many either refuses:
what the product refuses of an image whose header does not tell the view (a PNG or JPEG). ``--block-quantiles``
adds a column for another rule: each block's z-score against its own threshold, the given quantile of the
validation split's scores of that block (``1`` leaves a block out). Run it with the gate to evaluate::

    python bench/gate_eval.py --pack packs/cxr-full.pack [--gate cxr_triage/models/cae_gate.pt] [--json out.json]

``--max-chest N`` samples the test split (the altered categories use at most ``--per-category`` of them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_triage.ml import symmetry  # noqa: E402
from cxr_triage.ml.gate import TypicalityGate, load_gate  # noqa: E402
from cxr_triage.ml.imaging import to_model_input  # noqa: E402

SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"


def stretch(image: np.ndarray) -> np.ndarray:
    """Any 2-D array to float32 in [0, 1] (min-max)."""
    a = np.asarray(image, dtype=np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return np.zeros(a.shape, dtype=np.float32) + (0.0 if not math.isfinite(lo) else float(lo > 0))
    return ((a - lo) / (hi - lo)).astype(np.float32)


def to_grey(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.float32)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    while a.ndim > 2:
        a = a[0]
    return a


def pydicom_images() -> Iterator[tuple[str, np.ndarray]]:
    """(category, image in [0, 1]) for every decodable bundled pydicom image, duplicates removed."""
    import pydicom
    from pydicom.data import get_testdata_files

    from cxr_triage.ml.preprocess import decode_unit_image

    seen: set[str] = set()
    for path in sorted(get_testdata_files()):
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds:
                continue
            if ds.get("Modality") in ("CR", "DX") and "CHEST" in str(ds.get("BodyPartExamined", "")).upper():
                continue
            try:
                unit = decode_unit_image(ds)
            except Exception:
                unit = stretch(to_grey(ds.pixel_array))
            if unit.ndim != 2 or min(unit.shape) < 8:
                continue
        except Exception:
            continue
        key = hashlib.sha256((to_model_input(unit)[0, ::8, ::8] * 31).round().numpy().tobytes()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        yield f"pydicom {ds.get('Modality', '?')}", unit


def skimage_images() -> Iterator[tuple[str, np.ndarray]]:
    import skimage.data

    for name in sorted(skimage.data.__all__):
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # images that scikit-image would download are not bundled: skipped
            continue
        if not hasattr(image, "shape") or name == "lfw_subset":
            continue
        yield "skimage", stretch(to_grey(image))


def synthetic_images(per_kind: int, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for i in range(per_kind):
        size = int(rng.integers(256, 1024))
        yield "noise uniform", rng.random((size, size), dtype=np.float32)
        yield "noise gaussian", np.clip(rng.normal(0.5, rng.uniform(0.05, 0.3), (size, size)), 0, 1).astype(np.float32)
        level = (i + 0.5) / per_kind
        yield "constant", np.full((size, size), level, dtype=np.float32)
        yield "black or white", np.full((size, size), float(i % 2), dtype=np.float32)
        ramp = np.linspace(0, 1, size, dtype=np.float32)
        yield "gradient", np.outer(ramp, np.ones(size, np.float32)) if i % 2 else np.outer(np.ones(size), ramp)
        squares = int(rng.integers(2, 16))
        yield "checkerboard", (np.indices((size, size)).sum(0) // (size // squares) % 2).astype(np.float32)


ALTERATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "chest inverted": lambda x: 1.0 - x,
    "chest rotated 90": lambda x: torch.rot90(x, 1, (-2, -1)),
    "chest rotated 180": lambda x: torch.rot90(x, 2, (-2, -1)),
    "chest rotated 270": lambda x: torch.rot90(x, 3, (-2, -1)),
    "chest central crop": lambda x: x[..., 73:151, 73:151],
    "chest corner crop": lambda x: x[..., :90, :90],
}


def pack_split(pack_path: Path, split: str, limit: int | None, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(N, 224, 224) float images of a split in [0, 1] and each one's source name (the training module's reader)."""
    from training.pack import decode_pack, load_pack

    data = decode_pack(load_pack(pack_path))
    idx = data.indices(split)
    if limit is not None and idx.numel() > limit:
        idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))[:limit]]
    assert data.sources is not None
    return data.images[idx].float() / 255.0, [data.source_names[int(i)] for i in data.sources[idx]]


def altered_images(chest: torch.Tensor, per_category: int) -> Iterator[tuple[str, np.ndarray]]:
    for name, alter in ALTERATIONS.items():
        for image in chest[:per_category]:
            yield name, alter(image).contiguous().numpy()


Scored = tuple[str, torch.Tensor, float]
"""(category, the gate's block z-scores, the symmetry score) of one image."""


def score_all(gate: TypicalityGate, items: Sequence[tuple[str, np.ndarray | torch.Tensor]]) -> list[Scored]:
    tensors = [to_model_input(image) for _, image in items]
    blocks, sym = [], []
    for start in range(0, len(tensors), 64):
        batch = torch.stack(tensors[start : start + 64])
        blocks.append(gate.block_scores(batch))
        sym.append(symmetry.symmetry_scores(batch))
    b, v = torch.cat(blocks), torch.cat(sym)
    return [(category, b[i], float(v[i])) for i, (category, _) in enumerate(items)]


def shared_dicom_scores(gate: TypicalityGate) -> list[Scored]:
    from cxr_triage.ml.preprocess import PreparedImage, prepare_path

    out = []
    for path in sorted(SHARED_DICOM.glob("*.dcm")):
        prepared = prepare_path(path)
        if isinstance(prepared, PreparedImage):
            batch = prepared.tensor[None]
            out.append(
                (f"real DICOM {path.name}", gate.block_scores(batch)[0], float(symmetry.symmetry_scores(batch)[0]))
            )
    return out


def block_thresholds(gate: TypicalityGate, validation: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    """Per block: the quantile of the validation split's z-scores of that block (infinite for a quantile of 1)."""
    blocks = gate.block_scores(torch.stack([to_model_input(image) for image in validation]))
    return torch.tensor(
        [float(torch.quantile(blocks[:, i].double(), q)) if q < 1 else math.inf for i, q in enumerate(quantiles)]
    )


def table(
    scored: list[Scored], gate: TypicalityGate, per_block: torch.Tensor | None = None
) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for category, blocks, sym in scored:
        row = rows.setdefault(
            category, {"images": 0, "refused": 0, "refused_view": 0, "refused_either": 0, "scores": []}
        )
        score = float(gate.combine(blocks[None])[0])
        gate_refuses, view_refuses = gate.refuses(score), not sym >= symmetry.THRESHOLD
        row["images"] += 1
        row["refused"] += int(gate_refuses)
        row["refused_view"] += int(view_refuses)
        row["refused_either"] += int(gate_refuses or view_refuses)
        if per_block is not None:
            row["refused_per_block"] = row.get("refused_per_block", 0) + int(bool((blocks > per_block).any()))
        row["scores"].append(score)
    for row in rows.values():
        s = np.array(row.pop("scores"))
        row["share_refused"] = row["refused"] / row["images"]
        row["median_score"] = float(np.median(s))
    return rows


def summarise(non_chest: dict[str, dict[str, Any]], chest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def total(rows: list[dict[str, Any]], key: str) -> int:
        return sum(r.get(key, 0) for r in rows)

    n = total(list(non_chest.values()), "images")
    test = chest.get("chest test split", {"images": 0})
    sources = {k: v for k, v in chest.items() if k.startswith("test: ")}
    out: dict[str, Any] = {"non_chest_images": n, "chest_test_images": test["images"]}
    for key in ("refused", "refused_view", "refused_either", "refused_per_block"):
        if key not in test:
            continue
        out[f"non_chest_{key}_share"] = total(list(non_chest.values()), key) / n if n else None
        out[f"chest_test_{key}_share"] = test[key] / test["images"] if test["images"] else None
        out[f"worst_source_{key}_share"] = max((r[key] / r["images"] for r in sources.values()), default=None)
    return out


def print_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    per_block = any("refused_per_block" in r for r in rows.values())
    head = f"{'category':<44} {'images':>7} {'gate':>6} {'share':>7} {'view':>5} {'either':>7} {'share':>7}"
    print(f"\n{title}\n{head}{' per-block rule' if per_block else ''} {'median score':>13}")
    for name, r in rows.items():
        line = (
            f"{name:<44} {r['images']:>7} {r['refused']:>6} {100 * r['share_refused']:>6.1f}% {r['refused_view']:>5}"
            f" {r['refused_either']:>7} {100 * r['refused_either'] / r['images']:>6.1f}%"
        )
        if per_block:
            line += f" {r['refused_per_block']:>5} ({100 * r['refused_per_block'] / r['images']:5.1f}%)"
        print(f"{line} {r['median_score']:>13.2f}")


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pack", type=Path, required=True, help="the classifier's pack (its test split is used)")
    parser.add_argument("--gate", type=Path, default=None, help="gate file (default: the bundled one)")
    parser.add_argument("--false-refusal-rate", type=float, default=0.01, help="the gate's setting")
    parser.add_argument("--max-chest", type=int, default=None, help="test-split images used (default: all)")
    parser.add_argument("--per-category", type=int, default=50, help="images per altered-chest category")
    parser.add_argument("--synthetic", type=int, default=10, help="images per synthetic kind")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--block-quantiles", default=None, help="recon,texture,layout,outlier validation quantiles")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    opts = parser.parse_args(args)
    torch.manual_seed(opts.seed)
    gate = load_gate(opts.gate, opts.false_refusal_rate)
    per_block = None
    if opts.block_quantiles:
        validation, _ = pack_split(opts.pack, "val", None, opts.seed)
        per_block = block_thresholds(gate, validation, [float(q) for q in opts.block_quantiles.split(",")])
        print(f"per-block thresholds {dict(zip(gate.blocks, per_block.tolist(), strict=True))}")
    chest, sources = pack_split(opts.pack, "test", opts.max_chest, opts.seed)
    others: list[tuple[str, np.ndarray | torch.Tensor]] = [*pydicom_images(), *skimage_images()]
    others += list(synthetic_images(opts.synthetic, opts.seed))
    others += list(altered_images(chest, opts.per_category))
    non_chest = table(score_all(gate, others), gate, per_block)
    real = score_all(gate, [("chest test split", c) for c in chest])
    real += [(f"test: {source}", b, v) for (_, b, v), source in zip(real, sources, strict=True)]
    chest_rows = table(real + shared_dicom_scores(gate), gate, per_block)
    print(f"gate {gate.version} (sha256 {gate.sha256[:12]}), threshold {gate.threshold:.3f} at a false-refusal "
          f"rate of {opts.false_refusal_rate:.1%} on the validation split")  # fmt: skip
    print(f"pixel view check: refused below a symmetry score of {symmetry.THRESHOLD}")
    print_table("Not chest radiographs (should be refused)", non_chest)
    print_table("Chest radiographs (should pass)", chest_rows)
    summary = summarise(non_chest, chest_rows)
    print("\n" + json.dumps(summary, indent=2))
    if opts.json:
        opts.json.write_text(json.dumps({"summary": summary, "non_chest": non_chest, "chest": chest_rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
