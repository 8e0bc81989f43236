"""Fit the typicality gate (``cxr_triage.ml.gate``) for a trained classifier: ``python -m training.gate``.

1. The gate's encoder is the classifier's encoder, frozen (``--model``). A decoder is trained for it with MSE on
   training-split images (the classifier checkpoint keeps only the encoder; the autoencoder's own decoder is refit,
   which takes minutes because the encoder's outputs are computed once and cached). With ``--autoencoder`` the gate
   uses a pretrained autoencoder artefact (``training.autoencoder``) as it is instead: its encoder, its input
   normalisation and its own jointly trained decoder, no decoder training.
2. The texture and layout features of the training split are computed; a random 80 % fits the two Gaussians, the
   other 20 % sets each measure's median and spread (images the Gaussians never saw, so chest radiographs score
   as they will at run time).
3. The validation split's typicality scores are stored; the runtime's threshold is their
   ``1 - false_refusal_rate`` quantile. So are its block z-scores (``validation_block_scores``), and with
   ``--block-quantiles`` each block's quantile (``block_quantiles``): the gate then compares each block with its own
   threshold (``cxr_triage.ml.gate``), with no step by hand. The test split's refusal rate is reported.

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

from cxr_triage.files import file_sha256
from cxr_triage.ml.checkpoint import load_classifier
from cxr_triage.ml.gate import (
    BLOCKS,
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
from training.autoencoder import load_autoencoder
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


def measures_of(
    network: Autoencoder, images: torch.Tensor, batch_size: int, reconstruct: bool = True
) -> dict[str, torch.Tensor]:
    """``Autoencoder.measures`` of uint8 ``images``, a batch at a time (without the decoder: no ``recon``)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, images.shape[0], batch_size):
        m = network.measures(model_inputs(images[start : start + batch_size]), reconstruct)
        for key, value in m.items():
            parts.setdefault(key, []).append(value)
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


def block_scores_of(gate: TypicalityGate, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, blocks) z-scores of uint8 ``images``, converted to model inputs a batch at a time (bounded memory)."""
    rows = [gate.block_scores(model_inputs(images[s : s + batch_size])) for s in range(0, images.shape[0], batch_size)]
    return torch.cat(rows) if rows else torch.empty(0, len(gate.blocks))


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
    block_quantiles: dict[str, float] | None = None,
) -> TypicalityGate:
    """The gate's statistics from training images (``train``, uint8) and its stored scores from ``val``.

    ``negatives`` altered copies of fit-part training images train the outlier model (default: as many as the
    fit part has images); held-out training images, never altered nor fitted, set every block's scale. The gate
    stores the validation split's block z-scores, and compares each block with its own threshold when
    ``block_quantiles`` are given.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train.shape[0], generator=generator)
    cut = max(1, int(round(train.shape[0] * (1 - held_out))))
    fit_idx, held_idx = order[:cut], order[cut:]
    m = measures_of(network, train[fit_idx], batch_size, reconstruct=False)
    gaussians = {b: GaussianModel.fit(m[b], rank=rank) for b in ("texture", "layout")}
    count = min(negatives or len(fit_idx), len(fit_idx))
    bad = measures_of(network, altered(train[fit_idx[:count]], seed), batch_size, reconstruct=False)

    def standardised(measures: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([gaussians[b].standardise(measures[b]) for b in ("texture", "layout")], 1)

    outlier = fit_outlier_model(standardised(m), standardised(bad))
    gaussians = as_stored(network, gaussians)
    held = raw_values(measures_of(network, train[held_idx], batch_size), gaussians, outlier)
    scales = {b: RobustScale.fit(v) for b, v in held.items()}
    provisional = TypicalityGate(network, gaussians, scales, torch.zeros(20), version=version, outlier=outlier)
    val_blocks = block_scores_of(provisional, val, batch_size)
    val_scores = torch.tensor([round(float(s), 4) for s in provisional.combine(val_blocks)])
    return TypicalityGate(
        network, gaussians, scales, val_scores, version=version, outlier=outlier,
        validation_block_scores=val_blocks, block_quantiles=block_quantiles,
    )  # fmt: skip


def _split_indices(data: ImageSet, name: str, limit: int | None, seed: int) -> torch.Tensor:
    idx = data.indices(name)
    if limit is not None and idx.numel() > limit:
        idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))[:limit]]
    return idx


def _split(data: ImageSet, name: str, limit: int | None, seed: int) -> torch.Tensor:
    return data.images[_split_indices(data, name, limit, seed)]


def load_network(args: argparse.Namespace) -> tuple[Autoencoder, dict[str, Any], bool]:
    """The gate's autoencoder, what the provenance says of it, and whether its decoder still has to be trained."""
    if args.autoencoder is not None:
        artefact = load_autoencoder(args.autoencoder)
        network = Autoencoder(artefact.width, artefact.input_norm)
        network.encoder.load_state_dict(artefact.encoder)
        network.decoder.load_state_dict(artefact.decoder)
        source = {
            "autoencoder": Path(args.autoencoder).name,
            "autoencoder_sha256": file_sha256(args.autoencoder),
            "autoencoder_epochs": artefact.epochs,
            "autoencoder_best_val_mse": artefact.best_val_mse,
            "width": artefact.width,
            "input_norm": artefact.input_norm,
        }
        return network.requires_grad_(False), source, False
    loaded = load_classifier(args.model)
    network = Autoencoder(loaded.card.spec.width, loaded.card.spec.input_norm)
    network.encoder.load_state_dict(loaded.model.encoder.state_dict())
    network.encoder.requires_grad_(False)
    return network, {"classifier": loaded.card.model_version, "classifier_sha256": loaded.sha256}, True


def parse_block_quantiles(text: str | None) -> dict[str, float] | None:
    """``recon,texture,layout,outlier`` quantiles (each in (0.5, 1]; 1 leaves a block out of the decision)."""
    if not text:
        return None
    values = [float(v) for v in text.split(",")]
    if len(values) != len(BLOCKS) or not all(0.5 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"--block-quantiles needs {len(BLOCKS)} values in (0.5, 1]: {text!r}")
    return dict(zip(BLOCKS, values, strict=True))


def decoder_for(network: Autoencoder, data: ImageSet, val: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """Train (or reload from ``--decoder-state``) the decoder for a classifier's encoder; its per-epoch history."""
    if args.decoder_state is not None and args.decoder_state.exists():
        saved = torch.load(args.decoder_state, weights_only=True)
        network.decoder.load_state_dict(saved["decoder"])
        return list(saved["history"])
    limit = args.decoder_images if args.limit is None else min(args.decoder_images, args.limit)
    train = _split(data, "train", limit, args.seed)
    history = train_decoder(network, train, val[:512], args.epochs, 32, args.lr)
    if args.decoder_state is not None:
        torch.save({"decoder": network.decoder.state_dict(), "history": history}, args.decoder_state)
    return history


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    quantiles = parse_block_quantiles(args.block_quantiles)
    network, source, needs_decoder = load_network(args)
    data = decode_pack(load_pack(args.pack))
    train, val, test = (_split(data, name, args.limit, args.seed) for name in ("train", "val", "test"))
    if args.train_images is not None:
        train = _split(data, "train", min(args.train_images, args.limit or args.train_images), args.seed)
    started = time.monotonic()
    history = decoder_for(network, data, val, args) if needs_decoder else []
    gate = fit_gate(
        network, train, val, seed=args.seed, version=args.version, negatives=args.negatives, block_quantiles=quantiles
    )
    test_blocks = block_scores_of(gate, test)
    test_scores = gate.combine(test_blocks)
    provenance = {
        **source,
        "pack": Path(args.pack).name,
        "pack_meta": {k: v for k, v in data.meta.items() if isinstance(v, int | float | str)},
        "decoder_history": history,
        "decoder_seconds": round(sum(row["seconds"] for row in history), 1),
        "images": {"train": int(train.shape[0]), "val": int(val.shape[0]), "test": int(test.shape[0])},
        "block_quantiles": quantiles,
        "torch": str(torch.__version__),
    }
    digest = save_gate(gate, args.out, provenance)
    summary = {
        "out": str(args.out),
        "sha256": digest,
        "bytes": Path(args.out).stat().st_size,
        "threshold_at_1pct": round(gate.threshold, 4),
        "block_thresholds": gate.block_thresholds(),
        "test_refused": float((test_scores > gate.threshold).float().mean()),
        "decoder_val_mse": history[-1]["val_mse"] if history else source.get("autoencoder_best_val_mse"),
        "seconds": round(time.monotonic() - started, 1),
        "outlier_negatives": True,
    }
    if args.scores:
        save_scores(args, data, gate, test_blocks)
    return summary


def save_scores(args: argparse.Namespace, data: ImageSet, gate: TypicalityGate, test_blocks: torch.Tensor) -> None:
    """Validation and test scores; the block z-scores and source of each image, in split order (to choose block
    quantiles on the validation split)."""
    scores: dict[str, Any] = {"blocks": list(gate.blocks), "source_names": list(data.source_names)}
    scores |= {"val": gate.validation_scores, "test": gate.combine(test_blocks)}  # as before: val sorted
    for name, blocks in (("val", gate.validation_block_scores), ("test", test_blocks)):
        assert blocks is not None
        idx = _split_indices(data, name, args.limit, args.seed)
        scores[f"{name}_blocks"] = blocks
        scores[f"{name}_sources"] = data.sources[idx] if data.sources is not None else None
    torch.save(scores, args.scores)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.gate", description=__doc__.split("\n")[0])
    network = parser.add_mutually_exclusive_group(required=True)
    network.add_argument("--model", help="classifier checkpoint whose encoder the gate uses (a decoder is trained)")
    network.add_argument(
        "--autoencoder",
        type=Path,
        help="autoencoder artefact (training.autoencoder) whose encoder and decoder the gate uses as they are",
    )
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
    parser.add_argument(
        "--block-quantiles",
        default=None,
        help="recon,texture,layout,outlier: per-block thresholds, each the quantile of the validation split's "
        "z-scores of its block (1 leaves a block out); stored in the gate file",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="at most this many images of each split (a quick trial run)"
    )
    parser.add_argument(
        "--train-images", type=int, default=None, help="training images the statistics are fitted on (default: all)"
    )
    parser.add_argument(
        "--negatives",
        type=int,
        default=None,
        help="altered training images for the outlier model (default: the fit part)",
    )
    return parser


def main(args: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(build_parser().parse_args(args))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
