"""Does the classifier recognise the disease or the data set? Leave-one-source-out tests on the frozen encoder.

The shared images come from several public data sets, and each holds mostly one class (nearly all pneumonia
images are paediatric, from one source; COVID-19 images are adult, from others), so a model can score well on a
random split by recognising where an image came from. ``python -m training sources`` measures that:

- features: the pretrained autoencoder's encoder (``encoder.pt`` of ``pretrain``, trained without labels on the
  training split only) encodes every image once (``training.features.FeatureBank``);
- for each source S: a classification head (the proposed LSTM + Dense head, phase 1 of fine-tuning) is trained on
  the training-split images of every *other* source, early-stopped on their validation split, then tested on S's
  validation and test images, which neither the encoder nor the head has seen;
- the reference: the same head trained on the training split of all sources, tested on the same images of S.

Both are run with and without ``--balance-sources`` weighting (``training.data.independence_weights``), so the
report shows how much each source's accuracy depends on having seen that source, and whether the weighting helps.
A full fine-tune per source would be the stronger test; on a CPU it does not fit (phase 2 takes most of a run).

Writes ``sources.json`` (every figure) and ``sources.md`` (a table) under ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from cxr_triage.ml.model import CAEClassifier, ModelSpec
from training import data as data_mod
from training.engine import Runtime, evaluate, seed_everything, train_one_epoch
from training.features import FeatureBank
from training.metrics import per_source_metrics
from training.report import write_json

logger = logging.getLogger(__name__)


def train_head(
    spec: ModelSpec,
    encoder_state: dict[str, torch.Tensor],
    bank: FeatureBank,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    rt: Runtime,
    args: argparse.Namespace,
    weights: torch.Tensor | None,
) -> CAEClassifier:
    """Phase 1 of fine-tuning on cached features: the head with the lowest validation loss."""
    seed_everything(args.seed, rt.rank)
    model = CAEClassifier(spec)
    model.encoder.load_state_dict(encoder_state)
    model = rt.prepare(model)
    head = model.head
    optimizer = torch.optim.Adam(head.parameters(), lr=args.phase1_lr)
    best_loss, best_state, bad = math.inf, None, 0
    for epoch in range(args.phase1_epochs):
        train_one_epoch(
            head,
            optimizer,
            bank.inputs,
            train_idx,
            rt,
            batch_size=args.phase1_batch_size,
            seed=args.seed,
            epoch=epoch,
            weights=weights,
        )
        val = evaluate(head, bank.data, val_idx, rt, args.eval_batch_size, inputs=bank.inputs)
        if val.loss < best_loss:
            best_loss, bad = val.loss, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            bad += 1
            if bad >= args.phase1_patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    return model


def _held_out_figures(
    model: CAEClassifier, bank: FeatureBank, data: data_mod.ImageSet, idx: torch.Tensor, rt: Runtime, args: Any
) -> dict[str, Any]:
    res = evaluate(model.head, data, idx, rt, args.eval_batch_size, inputs=bank.inputs)
    assert data.sources is not None
    table = per_source_metrics(
        res.labels, res.probabilities, data.sources[idx].cpu(), data.source_names, data.class_names
    )
    return next(iter(table.values())) if table else {}


def run_sources(args: argparse.Namespace, rt: Runtime, data: data_mod.ImageSet) -> dict[str, Any]:
    """Leave-one-source-out and reference heads, with and without source balancing (module docstring)."""
    payload = torch.load(args.encoder, map_location="cpu", weights_only=True)
    spec = ModelSpec(head=args.head, width=int(payload["width"]), dense_units=args.dense_units)
    encoder_state = payload["state_dict"]
    probe = rt.prepare(CAEClassifier(spec))
    probe.encoder.load_state_dict(encoder_state)
    t0 = time.perf_counter()
    bank = FeatureBank(probe.encoder, data, torch.arange(len(data)), rt, args.eval_batch_size)
    logger.info("features of %d images in %.1f s", bank.images, bank.seconds)
    assert data.sources is not None
    split, sources, labels = data.split.cpu(), data.sources.cpu(), data.labels.cpu()
    train, val, unseen = split == 0, split == 1, split >= 1
    rows: list[dict[str, Any]] = []
    all_train, all_val = torch.nonzero(train).flatten(), torch.nonzero(val).flatten()
    for balanced in (False, True):

        def weights_of(tr: torch.Tensor, balanced: bool = balanced) -> torch.Tensor | None:
            return data_mod.independence_weights(labels[tr], sources[tr]) if balanced else None

        # the reference head sees every source: one per weighting, tested on each source's unseen images
        reference = train_head(spec, encoder_state, bank, all_train, all_val, rt, args, weights_of(all_train))
        for s, name in enumerate(data.source_names):
            held = torch.nonzero(unseen & (sources == s)).flatten()
            if len(held) < args.min_held_out:
                logger.info("%s: %d held-out images, too few; skipped", name, len(held))
                continue
            tr = torch.nonzero(train & (sources != s)).flatten()
            va = torch.nonzero(val & (sources != s)).flatten()
            left_out = train_head(spec, encoder_state, bank, tr, va, rt, args, weights_of(tr))
            row: dict[str, Any] = {
                "source": name,
                "balanced": balanced,
                "images": len(held),
                "left_out": _held_out_figures(left_out, bank, data, held, rt, args),
                "reference": _held_out_figures(reference, bank, data, held, rt, args),
            }
            rows.append(row)
            logger.info(
                "%s (%s): accuracy %.3f left out, %.3f when seen",
                name,
                "balanced" if balanced else "plain",
                row["left_out"].get("accuracy", float("nan")),
                row["reference"].get("accuracy", float("nan")),
            )
    summary = {
        "encoder": str(args.encoder),
        "spec": spec.to_dict(),
        "device": rt.device_name,
        "seconds": round(time.perf_counter() - t0, 1),
        "phase1": {k: getattr(args, k) for k in ("phase1_lr", "phase1_epochs", "phase1_batch_size", "phase1_patience")},
        "sources": data.source_table(),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sources.json", summary)
    (out / "sources.md").write_text(sources_markdown(summary), encoding="utf-8")
    return summary


def _called(figures: dict[str, Any]) -> str:
    parts = []
    for true, called in sorted(figures.get("called", {}).items()):
        parts.append(f"{true}: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in called.items() if v >= 0.005))
    return "; ".join(parts)


def sources_markdown(summary: dict[str, Any]) -> str:
    """The leave-one-source-out table as Markdown."""
    lines = [
        "# Leave one source out (frozen pretrained encoder, phase-1 head)",
        "",
        f"Encoder `{summary['encoder']}`, {summary['device']}, {summary['seconds']} s. Held-out images: the source's "
        "validation and test split, never seen by the encoder or the head.",
        "",
        "| held-out source | weighting | images | accuracy, source left out | accuracy, source seen | "
        "what each true class was called (left out) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in summary["rows"]:
        left, ref = row["left_out"], row["reference"]
        lines.append(
            f"| {row['source']} | {'balanced' if row['balanced'] else 'plain'} | {row['images']} | "
            f"{100 * left.get('accuracy', float('nan')):.1f} % | {100 * ref.get('accuracy', float('nan')):.1f} % | "
            f"{_called(left)} |"
        )
    return "\n".join(lines) + "\n"
