"""Fit the typicality gate (``cxr_triage.ml.gate``) for a trained classifier: ``python -m training.gate``.

1. The gate's encoder is the classifier's encoder, frozen. A decoder is trained for it with MSE on training-split
   images (the classifier checkpoint keeps only the encoder; the autoencoder's own decoder is refit, which takes
   minutes because the encoder's outputs are computed once and cached).
2. The texture and layout features of the training split are computed; a random 80 % fits the two Gaussians, the
   other 20 % sets each measure's median and spread (images the Gaussians never saw, so chest radiographs score
   as they will at run time).
3. The validation split's typicality scores are stored; the runtime's threshold is their
   ``1 - false_refusal_rate`` quantile. The test split's refusal rate at the default 1 % is reported.

Writes the gate file (weights in fp16) with its ``.sha256`` sidecar and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as nn_f

from cxr_triage.ml.checkpoint import load_classifier
from cxr_triage.ml.gate import (
    Autoencoder,
    GaussianModel,
    OutlierModel,
    RobustScale,
    TypicalityGate,
    as_stored,
    raw_values,
    save_gate,
)
from cxr_triage.ml.imaging import to_model_batch, uint8_to_unit
from training.data import ImageSet
from training.pack import decode_pack, load_pack

logger = logging.getLogger(__name__)


def model_inputs(images: torch.Tensor) -> torch.Tensor:
    """(N, 224, 224) uint8 -> (N, 3, 224, 224) float in [0, 1], through the runtime's own last pixel steps."""
    return to_model_batch(uint8_to_unit(images)[:, None])


def encode(network: Autoencoder, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The encoder's last feature maps of ``images`` (uint8), computed once for decoder training."""
    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            out.append(network.encoder(model_inputs(images[start : start + batch_size])))
    return torch.cat(out)


def _target(network: Autoencoder, images_u8: torch.Tensor) -> torch.Tensor:
    """The grey channel the decoder reconstructs: the image as the encoder sees it (normalised)."""
    return network.encoder.normalise(uint8_to_unit(images_u8)[:, None])


def train_decoder(
    network: Autoencoder, images: torch.Tensor, val_images: torch.Tensor, epochs: int, batch_size: int, lr: float
) -> list[dict[str, float]]:
    """Fit the decoder to the frozen encoder (MSE on the grey channel); returns per-epoch train/val MSE."""
    codes, val_codes = encode(network, images, batch_size), encode(network, val_images, batch_size)
    optimiser = torch.optim.Adam(network.decoder.parameters(), lr=lr)
    history = []
    for epoch in range(1, epochs + 1):
        started, total, seen = time.monotonic(), 0.0, 0
        network.decoder.train()
        for idx in torch.randperm(codes.shape[0]).split(batch_size):
            target = _target(network, images[idx])
            loss = (network.decoder(codes[idx])[:, :1] - target).square().mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        network.decoder.eval()
        with torch.inference_mode():
            val = sum(
                float((network.decoder(val_codes[i])[:, :1] - _target(network, val_images[i])).square().sum())
                for i in torch.arange(val_codes.shape[0]).split(batch_size)
            ) / (val_codes.shape[0] * 224 * 224)
        row = {"epoch": epoch, "train_mse": total / seen, "val_mse": val, "seconds": time.monotonic() - started}
        logger.info("decoder epoch %d: train MSE %.5f, val MSE %.5f, %.0f s", *row.values())
        history.append(row)
    return history


def measures_of(network: Autoencoder, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {"recon": [], "texture": [], "layout": []}
    for start in range(0, images.shape[0], batch_size):
        m = network.measures(model_inputs(images[start : start + batch_size]))
        for key, value in m.items():
            parts[key].append(value)
    return {k: torch.cat(v) for k, v in parts.items()}


def altered(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Each uint8 image altered one way, chosen at random: rotated 90/180/270, upside down, inverted (also rotated),
    or cropped (a central or off-centre detail of 25-55 % of the side) and scaled back to 224x224."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(images)
    for i, image in enumerate(images):
        kind = int(torch.randint(0, 7, (1,), generator=g))
        if kind < 3:
            x = torch.rot90(image, kind + 1, (0, 1))
        elif kind == 3:
            x = image.flip(0)
        elif kind == 4:
            x = torch.rot90(255 - image, int(torch.randint(0, 4, (1,), generator=g)), (0, 1))
        else:
            side = int(224 * float(torch.empty(1).uniform_(0.25, 0.55, generator=g)))
            top = int(torch.randint(0, 224 - side + 1, (1,), generator=g))
            left = int(torch.randint(0, 224 - side + 1, (1,), generator=g))
            crop = image[top : top + side, left : left + side].float()[None, None]
            x = torch.nn.functional.interpolate(crop, size=(224, 224), mode="bilinear", antialias=True)[0, 0]
            x = x.round().clamp(0, 255).to(torch.uint8)
        out[i] = x
    return out


def fit_outlier_model(
    positives: torch.Tensor, negatives: torch.Tensor, weight_decay: float = 1e-3, steps: int = 300
) -> OutlierModel:
    """Logistic regression (classes weighted equally, L2 penalty) of altered (1) against chest (0) features."""
    x = torch.cat([positives, negatives]).float()
    y = torch.cat([torch.zeros(len(positives)), torch.ones(len(negatives))])
    sample_weight = torch.where(y == 1, 0.5 / len(negatives), 0.5 / len(positives))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = x @ w + b
        loss = (nn_f.binary_cross_entropy_with_logits(logits, y, reduction="none") * sample_weight).sum()
        loss = loss + weight_decay * w.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return OutlierModel(w.detach().clone(), float(b.detach()))


def fit_gate(
    network: Autoencoder,
    train: torch.Tensor,
    val: torch.Tensor,
    batch_size: int = 64,
    held_out: float = 0.2,
    rank: int = 256,
    seed: int = 0,
    version: str = "gate",
    negatives: int | None = None,
) -> TypicalityGate:
    """The gate's statistics from training images (``train``, uint8) and its stored scores from ``val``.

    ``negatives`` altered copies of fit-part training images train the outlier model (default: as many as the
    fit part has images); held-out training images, never altered nor fitted, set every block's scale.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train.shape[0], generator=generator)
    cut = max(1, int(round(train.shape[0] * (1 - held_out))))
    fit_idx, held_idx = order[:cut], order[cut:]
    m = measures_of(network, train, batch_size)
    gaussians = {b: GaussianModel.fit(m[b][fit_idx], rank=rank) for b in ("texture", "layout")}
    count = min(negatives or len(fit_idx), len(fit_idx))
    bad = measures_of(network, altered(train[fit_idx[:count]], seed), batch_size)

    def standardised(measures: dict[str, torch.Tensor], idx: torch.Tensor | None = None) -> torch.Tensor:
        pick = (lambda t: t[idx]) if idx is not None else (lambda t: t)
        return torch.cat([gaussians[b].standardise(pick(measures[b])) for b in ("texture", "layout")], 1)

    outlier = fit_outlier_model(standardised(m, fit_idx), standardised(bad))
    gaussians = as_stored(network, gaussians)
    held = raw_values(measures_of(network, train[held_idx], batch_size), gaussians, outlier)
    scales = {b: RobustScale.fit(v) for b, v in held.items()}
    provisional = TypicalityGate(network, gaussians, scales, torch.zeros(20), version=version, outlier=outlier)
    val_scores = torch.tensor(provisional.scores(model_inputs(val)))
    return TypicalityGate(network, gaussians, scales, val_scores, version=version, outlier=outlier)


def _split(data: ImageSet, name: str, limit: int | None, seed: int) -> torch.Tensor:
    idx = data.indices(name)
    if limit is not None and idx.numel() > limit:
        idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))[:limit]]
    return data.images[idx]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    loaded = load_classifier(args.model)
    network = Autoencoder(loaded.card.spec.width, loaded.card.spec.input_norm)
    network.encoder.load_state_dict(loaded.model.encoder.state_dict())
    network.encoder.requires_grad_(False)
    data = decode_pack(load_pack(args.pack))
    train = _split(data, "train", None, args.seed)
    val = _split(data, "val", None, args.seed)
    test = _split(data, "test", None, args.seed)
    started = time.monotonic()
    if args.decoder_state is not None and args.decoder_state.exists():
        saved = torch.load(args.decoder_state, weights_only=True)
        network.decoder.load_state_dict(saved["decoder"])
        history = saved["history"]
    else:
        history = train_decoder(
            network, _split(data, "train", args.decoder_images, args.seed), val[:512], args.epochs, 32, args.lr
        )
        if args.decoder_state is not None:
            torch.save({"decoder": network.decoder.state_dict(), "history": history}, args.decoder_state)
    decoder_seconds = sum(row["seconds"] for row in history)
    gate = fit_gate(network, train, val, seed=args.seed, version=args.version)
    test_scores = torch.tensor(gate.scores(model_inputs(test)))
    provenance = {
        "classifier": loaded.card.model_version,
        "classifier_sha256": loaded.sha256,
        "pack": Path(args.pack).name,
        "pack_meta": {k: v for k, v in data.meta.items() if isinstance(v, int | float | str)},
        "decoder_history": history,
        "decoder_seconds": round(decoder_seconds, 1),
        "images": {"train": int(train.shape[0]), "val": int(val.shape[0]), "test": int(test.shape[0])},
        "torch": str(torch.__version__),
    }
    digest = save_gate(gate, args.out, provenance)
    summary = {
        "out": str(args.out),
        "sha256": digest,
        "bytes": Path(args.out).stat().st_size,
        "threshold_at_1pct": round(gate.threshold, 4),
        "test_refused": float((test_scores > gate.threshold).float().mean()),
        "decoder_val_mse": history[-1]["val_mse"] if history else None,
        "seconds": round(time.monotonic() - started, 1),
        "outlier_negatives": True,
    }
    if args.scores:
        torch.save({"val": gate.validation_scores, "test": test_scores}, args.scores)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.gate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="classifier checkpoint whose encoder the gate uses")
    parser.add_argument("--pack", required=True, help="the pack the classifier was trained on (same split)")
    parser.add_argument(
        "--out", required=True, type=Path, help="gate file to write (e.g. cxr_triage/models/cae_gate.pt)"
    )
    parser.add_argument("--epochs", type=int, default=4, help="decoder training epochs")
    parser.add_argument("--decoder-images", type=int, default=4000, help="training images the decoder is fitted on")
    parser.add_argument("--lr", type=float, default=1e-3, help="decoder learning rate (Adam)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--version", default="cae-gate-1", help="the gate's version string")
    parser.add_argument(
        "--decoder-state",
        type=Path,
        default=None,
        help="reuse the decoder saved here by an earlier run (else train it and save it here)",
    )
    parser.add_argument("--scores", type=Path, default=None, help="also save validation and test scores here")
    return parser


def main(args: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(build_parser().parse_args(args))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
