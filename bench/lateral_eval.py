"""The pixel check for lateral views (``cxr_triage.ml.symmetry``): fits its constants and measures it.

- ``--pack``: the symmetry cues of the pack's validation and test splits (frontal radiographs, all of them);
  ``--fit`` prints the frontal scales and the threshold fitted on the validation split (paste them into the
  module); the share of each split and each source the check refuses, with the module's constants;
- renderings: the same validation images with a window twice as wide and with gamma 0.8 and 1.25, refused share;
- ``--laterals DIR``: real lateral chest radiographs (PNG/JPEG/DICOM; none ship with the project): each file's
  symmetry score, whether the check refuses it, and what the whole product (``prepare_path``) says of it; with
  ``--gate FILE`` also each file's typicality score and whether that gate refuses it (on the same grey image).

    python bench/lateral_eval.py --pack packs/cxr-full.pack [--fit] [--laterals DIR [--gate FILE]] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr_triage.ml import symmetry  # noqa: E402
from cxr_triage.ml.imaging import to_model_batch, to_model_input, uint8_to_unit  # noqa: E402

RENDERINGS = {
    "window twice as wide": lambda x: 0.25 + 0.5 * x,
    "gamma 0.8": lambda x: x.pow(0.8),
    "gamma 1.25": lambda x: x.pow(1.25),
}


def split_cues(pack: Path) -> dict[str, Any]:
    """Raw cues, source names and source ids of the validation and test splits."""
    from training.pack import decode_pack, load_pack

    data = decode_pack(load_pack(pack))
    out: dict[str, Any] = {"source_names": list(data.source_names)}
    for split in ("val", "test"):
        idx = data.indices(split)
        images = data.images[idx]
        raw = torch.cat([symmetry.cues(uint8_to_unit(images[s : s + 128])) for s in range(0, len(idx), 128)])
        assert data.sources is not None
        out[split] = {"cues": raw, "sources": data.sources[idx], "images": images}
    return out


def fit(raw: torch.Tensor, quantile: float = 0.005) -> tuple[dict[str, symmetry.CueScale], float]:
    """Frontal scales (median, IQR / 1.349) of each cue and the ``quantile`` of the resulting scores."""
    scales = {}
    for i, name in enumerate(symmetry.CUES):
        q1, q2, q3 = (float(torch.quantile(raw[:, i].double(), q)) for q in (0.25, 0.5, 0.75))
        scales[name] = symmetry.CueScale(round(q2, 4), round((q3 - q1) / 1.349, 4))
    threshold = float(torch.quantile(symmetry.scores_from_cues(raw, scales).double(), quantile))
    return scales, round(threshold, 3)


def refused_by_source(scores: torch.Tensor, sources: torch.Tensor, names: Sequence[str], threshold: float) -> dict:
    rows = {"all": {"images": len(scores), "refused": int((scores < threshold).sum())}}
    for i, name in enumerate(names):
        keep = sources == i
        rows[name] = {"images": int(keep.sum()), "refused": int((scores[keep] < threshold).sum())}
    for row in rows.values():
        row["share"] = row["refused"] / row["images"] if row["images"] else None
    return rows


def rendering_rows(images: torch.Tensor, threshold: float) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, render in RENDERINGS.items():
        scores = torch.cat(
            [
                symmetry.symmetry_scores(to_model_batch(render(uint8_to_unit(images[s : s + 128]))[:, None]))
                for s in range(0, images.shape[0], 128)
            ]
        )
        rows[name] = {"images": images.shape[0], "refused": int((scores < threshold).sum())}
    return rows


def lateral_rows(folder: Path, gate: Any = None) -> list[dict[str, Any]]:
    """Each file of ``folder``: its symmetry score (grey conversion for colour JPEGs), the product's verdict, and
    with a ``gate`` (``cxr_triage.ml.gate.TypicalityGate``) its typicality score and the gate's verdict."""
    from PIL import Image

    from cxr_triage.ml.preprocess import PreparedImage, prepare_path

    rows = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        prepared = prepare_path(path)
        if isinstance(prepared, PreparedImage):
            tensor = prepared.tensor
        else:
            with Image.open(path) as im:
                tensor = to_model_input(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
        score = float(symmetry.symmetry_scores(tensor)[0])
        row = {
            "file": path.name,
            "score": round(score, 3),
            "check_refuses": score < symmetry.THRESHOLD,
            "product": "passes" if isinstance(prepared, PreparedImage) else prepared.code,
        }
        if gate is not None:
            typicality = gate.scores(tensor[None])[0]
            row |= {"typicality": typicality, "gate_refuses": gate.refuses(typicality)}
        rows.append(row)
    return rows


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pack", type=Path, default=None, help="the classifier's pack (val and test splits)")
    parser.add_argument("--fit", action="store_true", help="print the constants fitted on the validation split")
    parser.add_argument("--laterals", type=Path, default=None, help="a folder of real lateral radiographs")
    parser.add_argument("--gate", type=Path, default=None, help="with --laterals: also score them with this gate")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    opts = parser.parse_args(args)
    torch.set_num_threads(1)
    report: dict[str, Any] = {"threshold": symmetry.THRESHOLD}
    if opts.pack:
        data = split_cues(opts.pack)
        if opts.fit:
            scales, threshold = fit(data["val"]["cues"])
            report["fitted"] = {"scales": {k: [v.median, v.spread] for k, v in scales.items()}, "threshold": threshold}
            print(json.dumps(report["fitted"], indent=2))
        for split in ("val", "test"):
            scores = symmetry.scores_from_cues(data[split]["cues"])
            rows = refused_by_source(scores, data[split]["sources"], data["source_names"], symmetry.THRESHOLD)
            report[split] = rows
            print(f"\n{split}: frontal radiographs refused as lateral (threshold {symmetry.THRESHOLD})")
            for name, row in rows.items():
                print(f"  {name:<36} {row['images']:>6} {row['refused']:>5} {100 * (row['share'] or 0):6.2f} %")
        report["renderings_val"] = rendering_rows(data["val"]["images"], symmetry.THRESHOLD)
        print("\nvalidation split, other renderings:", json.dumps(report["renderings_val"]))
    if opts.laterals:
        gate = None
        if opts.gate is not None:
            from cxr_triage.ml.gate import load_gate

            gate = load_gate(opts.gate)
        report["laterals"] = rows = lateral_rows(opts.laterals, gate)
        caught = sum(r["check_refuses"] for r in rows)
        print(f"\nreal lateral views: {caught} of {len(rows)} refused by the check")
        if gate is not None:
            by_gate = sum(r["gate_refuses"] for r in rows)
            either = sum(r["gate_refuses"] or r["check_refuses"] for r in rows)
            print(f"gate {gate.version} (sha256 {gate.sha256[:12]}): {by_gate} of {len(rows)} refused by the gate, "
                  f"{either} by the gate or the check")  # fmt: skip
        for row in rows:
            gated = f" typicality {row['typicality']:>7.2f} {row['gate_refuses']!s:>6}" if gate is not None else ""
            verdict = f"{row['score']:>7.2f} {row['check_refuses']!s:>6}{gated}"
            print(f"  {row['file']:<48} {verdict} product: {row['product']}")
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
