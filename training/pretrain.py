"""Pretraining: the convolutional autoencoder, trained with MSE and Adam on the training split, labels unused.

``run_pretrain`` is one *stretch* of the committed autoencoder's history (``training.autoencoder``). It writes
under ``--out``: ``encoder.pt`` (the encoder of the epoch with the lowest validation MSE, plus history) and
``pretrain_state.pt`` (resumable: autoencoder, optimizer, epoch, best weights, args, RNG state, history, the
stretch). ``load_encoder`` gives a classifier the encoder of either file format.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_triage.ml.model import CAEClassifier, ConvAutoencoder
from training import data as data_mod
from training.autoencoder import FORMAT as AUTOENCODER_FORMAT
from training.autoencoder import (
    AutoencoderArtefact,
    AutoencoderFileError,
    load_autoencoder,
    save_autoencoder,
    split_state,
)
from training.engine import (
    Deadline,
    EpochStats,
    Runtime,
    Within,
    check_replicas_agree,
    cpu_state_dict,
    evaluate_cae,
    image_inputs,
    load_state,
    plain_args,
    reconstruction_loss,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
    train_one_epoch,
    unwrap,
)
from training.loop import FitState, Phase, Validation, fit, fit_state_from, state_fields
from training.stretch import Stretch, new_row

logger = logging.getLogger(__name__)

ENCODER_FORMAT = "cxr-triage-encoder/1"
VAL_CAE_IMAGES = 1024
"""Validation MSE of the autoencoder is measured on at most this many validation images per epoch."""


@dataclass
class PretrainResult:
    encoder_path: Path
    history: list[dict[str, Any]]
    seconds: float
    images_per_second: float
    best_val_mse: float
    epochs: int
    complete: bool


def run_pretrain(
    args: argparse.Namespace, rt: Runtime, data: data_mod.ImageSet, deadline: Deadline | None = None
) -> PretrainResult:
    """Train the convolutional autoencoder (MSE, Adam) on the training split's images, labels unused.

    One call is one *stretch* (``training.autoencoder``): it may start from a committed artefact
    (``--init-autoencoder``) and writes it back (``--export-autoencoder``) when it improved on it.
    """
    out = Path(args.out)
    state_path, encoder_path = out / "pretrain_state.pt", out / "encoder.pt"
    seed_everything(args.seed, rt.rank)
    model = rt.prepare(ConvAutoencoder(args.width, args.input_norm))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.pretrain_lr, fused=rt.device.type == "cuda")
    stretch = _Stretch.start(args, rt, unwrap(model))
    resume = _resume_pretrain(args, state_path, unwrap(model), optimizer, stretch)
    if resume is not None and resume.epoch >= args.pretrain_epochs and encoder_path.is_file():
        logger.info("pretraining already ran %d epochs in %s; keeping %s", resume.epoch, state_path, encoder_path)
        return PretrainResult(encoder_path, resume.history, 0.0, 0.0, resume.best_score, resume.epoch, True)
    train_idx, val_idx = data.indices("train"), _cae_validation_images(data, args.seed)
    net = rt.wrap(model)
    inputs = image_inputs(
        data, rt, args.augment, args.augment and args.source_cues, size=args.pretrain_size, input_norm=args.input_norm
    )
    t0 = time.perf_counter()

    def train_epoch(epoch: int, limit: Deadline | None, within: Within) -> EpochStats:
        return train_one_epoch(
            net, optimizer, inputs, train_idx, rt, criterion=reconstruction_loss,
            batch_size=args.pretrain_batch_size, seed=args.seed + stretch.number, epoch=epoch, deadline=limit,
            within=within,
        )  # fmt: skip

    def validate() -> Validation:
        mse = evaluate_cae(unwrap(net), data, val_idx, rt, args.eval_batch_size)
        return Validation(mse, {"val_mse": mse})

    def save(fit_state: FitState) -> None:
        save_state(state_path, {"model": cpu_state_dict(net), "optimizer": optimizer.state_dict(),
                                **state_fields(fit_state, "best_mse", "best_autoencoder"), "args": plain_args(args),
                                "rng": rng_state(), "stretch": stretch.state()})  # fmt: skip
        stretch.export(fit_state)

    tags = {"size": args.pretrain_size}  # in every history row: the side this epoch trained at
    patience = args.pretrain_patience or None
    phase = Phase("pretrain", args.pretrain_epochs, patience, checkpoint_seconds=args.checkpoint_seconds, tags=tags)
    result = fit(phase, rt, train_epoch, validate, lambda: cpu_state_dict(unwrap(net)), save, deadline, resume)
    check_replicas_agree(net, rt, "pretrain")
    state = result.state
    if rt.is_main:
        _save_encoder(encoder_path, args, state, state.best if state.best is not None else cpu_state_dict(unwrap(net)))
        save(state)
    rt.barrier()
    complete = state.epoch >= args.pretrain_epochs
    seconds = time.perf_counter() - t0
    return PretrainResult(
        encoder_path, state.history, seconds, state.images_per_second, state.best_score, state.epoch, complete
    )


def _resume_pretrain(
    args: argparse.Namespace, state_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, stretch: _Stretch
) -> FitState | None:
    """With ``--resume`` and a state file: the stretch, weights, Adam moments and RNG it holds; its FitState."""
    if not (args.resume and state_path.is_file()):
        return None
    state = load_state(state_path)
    resume = fit_state_from(state, "best_mse", "best_autoencoder")
    stretch.restore(state.get("stretch"))
    if resume.epoch < args.pretrain_epochs:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        logger.info("resuming pretraining after epoch %d from %s", resume.epoch, state_path)
    return resume


def _cae_validation_images(data: data_mod.ImageSet, seed: int) -> torch.Tensor:
    """At most VAL_CAE_IMAGES validation images, a fixed seeded subset: the curve stays comparable across epochs."""
    val_idx = data.indices("val")
    if len(val_idx) > VAL_CAE_IMAGES:
        pick = torch.randperm(len(val_idx), generator=torch.Generator().manual_seed(seed))[:VAL_CAE_IMAGES]
        val_idx = val_idx[pick.to(val_idx.device)]
    return val_idx


def _save_encoder(path: Path, args: argparse.Namespace, state: FitState, best: dict[str, torch.Tensor]) -> None:
    """``encoder.pt``: the best autoencoder's encoder, for ``finetune --encoder``."""
    best_encoder, _ = split_state(best)
    encoder = {"format": ENCODER_FORMAT, "width": args.width, "input_norm": args.input_norm,
               "state_dict": best_encoder, "history": state.history, "best_val_mse": state.best_score,
               "args": plain_args(args)}  # fmt: skip
    save_state(path, encoder)
    logger.info("encoder (val MSE %.5f after %d epochs) saved to %s", state.best_score, state.epoch, path)


class _Stretch(Stretch[AutoencoderArtefact]):
    """This pretraining run as one stretch of the committed autoencoder's history (``training.autoencoder``).

    ``base`` is the artefact it started from; the resumable state keeps how much of it there was (epochs,
    stretches, best validation MSE), which is what ``restore`` cuts the artefact given now back to.
    """

    def prior_history(self) -> list[dict[str, Any]]:
        return self.base.history if self.base is not None else []

    def prior_stretches(self) -> list[dict[str, Any]]:
        return self.base.stretches if self.base is not None else []

    @property
    def floor(self) -> float:
        """The validation MSE the stretch must beat to be exported."""
        return self.base.best_val_mse if self.base is not None else math.inf

    def base_state(self) -> dict[str, Any] | None:
        if self.base is None:
            return None
        return {"epochs": self.base.epochs, "stretches": len(self.base.stretches), "best_val_mse": self.floor}

    def _restore_base(self, saved: dict[str, Any] | None) -> None:
        if saved is None:  # the stretch began from nothing: an artefact given now is this stretch's own export
            self.base = None
        elif self.base is not None:
            self.base.history = self.base.history[: saved["epochs"]]
            self.base.stretches = self.base.stretches[: saved["stretches"]]
            self.base.best_val_mse = float(saved["best_val_mse"])

    @classmethod
    def start(cls, args: argparse.Namespace, rt: Runtime, model: ConvAutoencoder) -> _Stretch:
        base = None
        if args.init_autoencoder:
            try:
                base = load_autoencoder(args.init_autoencoder)
                base.load_into(model)
            except AutoencoderFileError as exc:
                raise SystemExit(str(exc)) from exc
            logger.info(
                "pretraining continues %s: %d epochs over %d stretches, val MSE %.5f (fresh Adam moments)",
                args.init_autoencoder, base.epochs, len(base.stretches), base.best_val_mse,
            )  # fmt: skip
        settings = {"size": args.pretrain_size, "lr": args.pretrain_lr, "batch_size": args.pretrain_batch_size,
                    "augment": bool(args.augment)}  # fmt: skip
        number = len(base.stretches) if base is not None else 0
        row = new_row(number, rt, settings, args.init_autoencoder is not None)
        return cls(args, base, row, time.monotonic())

    def export(self, fit_state: FitState) -> None:
        """Write the artefact when this stretch's best beats the one it started from (or there was none)."""
        if not self.args.export_autoencoder or fit_state.best is None:
            return
        if fit_state.best_score >= self.floor:
            logger.info("autoencoder not exported: val MSE %.5f is not below %.5f", fit_state.best_score, self.floor)
            return
        encoder, decoder = split_state(fit_state.best)
        n, before = self.number, len(self.prior_history())
        rows = [{"stretch": n, **r, "epoch": before + r["epoch"]} for r in fit_state.history]
        history, stretches = self.accumulate(rows, fit_state.epoch, "best_val_mse", fit_state.best_score)
        save_autoencoder(
            self.args.export_autoencoder,
            AutoencoderArtefact(
                width=self.args.width,
                input_norm=self.args.input_norm,
                encoder=encoder,
                decoder=decoder,
                best_val_mse=fit_state.best_score,
                history=history,
                stretches=stretches,
            ),
        )
        logger.info("autoencoder exported to %s (val MSE %.5f)", self.args.export_autoencoder, fit_state.best_score)


def load_encoder(model: CAEClassifier, path: str | os.PathLike[str]) -> None:
    """The encoder of ``encoder.pt`` (pretrain's output) or of a committed autoencoder artefact."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and payload.get("format") == AUTOENCODER_FORMAT:
        payload = {"format": ENCODER_FORMAT, "width": payload["width"], "input_norm": payload["input_norm"],
                   "state_dict": {k: v.float() for k, v in payload["encoder"].items()}}  # fmt: skip
    if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT:
        raise SystemExit(f"{path}: not a {ENCODER_FORMAT} file (write one with `python -m training pretrain`)")
    if payload["width"] != model.spec.width:
        raise SystemExit(f"{path}: encoder width {payload['width']} but the classifier has width {model.spec.width}")
    norm = payload.get("input_norm", "none")
    if norm != model.spec.input_norm:
        raise SystemExit(
            f"{path}: encoder trained with input_norm {norm!r}, the classifier has {model.spec.input_norm!r}"
        )
    model.encoder.load_state_dict(payload["state_dict"])
