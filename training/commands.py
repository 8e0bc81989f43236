"""The training recipe: CAE pretraining, gradual-unfreezing fine-tuning, evaluation, ablation, one-shot run.

Each ``run_*`` function takes the parsed arguments (``training.__main__``), does its work on the runtime's
device, writes its files under ``args.out`` (rank 0 only) and returns a small result object, so that ``oneshot``
chains them and tests can look inside.

Files (all under ``--out``):

- pretrain: ``encoder.pt`` (the encoder of the epoch with the lowest validation MSE, plus history),
  ``pretrain_state.pt`` (resumable: autoencoder, optimizer, epoch, args, RNG state, history);
- finetune: ``model.pt`` (best classifier by validation loss, fp16, ``cxr_triage.ml.checkpoint`` format, updated at
  every improvement so a stopped run keeps its best model), ``finetune_state.pt`` (resumable: model, optimizer,
  phase, epoch, best weights, early-stopping counters, args, RNG state, history);
- evaluate: ``metrics.json``, ``report.md``, ``curves.png``, ``confusion.png``, ``roc.png``;
- ablation: ``ablation.json``, ``report.md``, ``ablation.png`` and one sub-folder per head.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_triage import CLASS_NAMES
from cxr_triage.ml.checkpoint import ModelCard, load_classifier, save_classifier
from cxr_triage.ml.model import HEADS, CAEClassifier, ConvAutoencoder, ModelSpec, keras_parameter_count
from cxr_triage.ml.precision import cpu_flags
from training import data as data_mod
from training.autoencoder import FORMAT as AUTOENCODER_FORMAT
from training.autoencoder import (
    AutoencoderArtefact,
    AutoencoderFileError,
    load_autoencoder,
    save_autoencoder,
    split_state,
)
from training.data import independence_weights
from training.engine import (
    Deadline,
    EpochStats,
    FeatureBank,
    Inputs,
    Runtime,
    check_replicas_agree,
    cpu_model_name,
    cpu_state_dict,
    evaluate,
    evaluate_cae,
    image_inputs,
    load_state,
    reconstruction_loss,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
    train_one_epoch,
    unwrap,
)
from training.loop import FitState, Phase, Validation, fit
from training.metrics import classification_metrics, per_source_metrics
from training.pack import decode_pack, load_pack
from training.report import report_from_summary, write_json

logger = logging.getLogger(__name__)

ENCODER_FORMAT = "cxr-triage-encoder/1"
VAL_CAE_IMAGES = 1024
"""Validation MSE of the autoencoder is measured on at most this many validation images per epoch."""


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as plain JSON values (for checkpoints and provenance)."""
    out: dict[str, Any] = {}
    for k, v in sorted(vars(args).items()):
        if k.startswith("_"):
            continue
        out[k] = v if isinstance(v, str | int | float | bool | type(None)) else str(v)
    return out


# ----------------------------------------------------------------------------------------------------- data


def load_data(args: argparse.Namespace, rt: Runtime) -> data_mod.ImageSet:
    """The image set named by ``--pack`` (decoded on the runtime's device) or ``--manifest`` (decoded on the CPU)."""
    t0 = time.perf_counter()
    if getattr(args, "pack", None):
        data = decode_pack(load_pack(args.pack), device=rt.device)
        where = f"pack {args.pack}"
    elif getattr(args, "manifest", None):
        manifest = data_mod.read_manifest(args.manifest, args.root)
        split = data_mod.split_records(manifest.records, seed=args.split_seed)
        data = data_mod.load_manifest_images(manifest, split, progress=rt.progress).to(rt.device)
        where = f"manifest {args.manifest}"
    else:
        raise SystemExit("no data: give --pack PACK or --manifest CSV|FOLDER (or set them in the config)")
    seconds = time.perf_counter() - t0
    data.meta["load_seconds"] = round(seconds, 2)
    if rt.is_main:
        logger.info("%d images from %s decoded on %s in %.1f s", len(data), where, rt.device, seconds)
        logger.info("class balance:\n%s", data.table())
    for s in data_mod.SPLITS:
        if len(data.indices(s)) == 0:
            raise SystemExit(f"the {s} split is empty: not enough images/components for a 73/13.5/13.5 split")
    return data


# ------------------------------------------------------------------------------------------------- pretrain


@dataclass
class PretrainResult:
    encoder_path: Path
    history: list[dict[str, Any]]
    seconds: float
    images_per_second: float
    best_val_mse: float
    epochs: int
    complete: bool


def _fit_state(state: dict[str, Any], score_key: str, best_key: str) -> FitState:
    """The FitState kept in a state file (``_state_fields`` wrote it)."""
    return FitState(
        epoch=state["epoch"],
        bad_epochs=state.get("bad_epochs", 0),
        best_score=state[score_key],
        best=state.get(best_key),
        history=list(state["history"]),
        seconds=state.get("fit_seconds", 0.0),
        images=state.get("fit_images", 0),
    )


def _state_fields(fit_state: FitState, score_key: str, best_key: str) -> dict[str, Any]:
    """A FitState as the documented keys of a state file (epoch, bad_epochs, the best score and weights)."""
    return {
        "epoch": fit_state.epoch,
        "bad_epochs": fit_state.bad_epochs,
        score_key: fit_state.best_score,
        best_key: fit_state.best,
        "history": fit_state.history,
        "fit_seconds": fit_state.seconds,
        "fit_images": fit_state.images,
    }


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

    def train_epoch(epoch: int, limit: Deadline | None) -> EpochStats:
        return train_one_epoch(
            net, optimizer, inputs, train_idx, rt, criterion=reconstruction_loss,
            batch_size=args.pretrain_batch_size, seed=args.seed + stretch.number, epoch=epoch, deadline=limit,
        )  # fmt: skip

    def validate() -> Validation:
        mse = evaluate_cae(unwrap(net), data, val_idx, rt, args.eval_batch_size)
        return Validation(mse, {"val_mse": mse})

    def save(fit_state: FitState) -> None:
        save_state(state_path, {"model": cpu_state_dict(net), "optimizer": optimizer.state_dict(),
                                **_state_fields(fit_state, "best_mse", "best_autoencoder"), "args": plain_args(args),
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
    resume = _fit_state(state, "best_mse", "best_autoencoder")
    stretch.restore(state)
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


def machine_description() -> str:
    """The processor and what it computes bf16 with, e.g. ``AMD EPYC (2 cores, AVX512-BF16)``."""
    flags = cpu_flags()
    isa = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 hardware"
    return f"{cpu_model_name()} ({os.cpu_count()} cores, {isa})"


@dataclass
class _Stretch:
    """This pretraining run as one stretch of the committed autoencoder's history (``training.autoencoder``)."""

    args: argparse.Namespace
    base: AutoencoderArtefact | None
    row: dict[str, Any]
    started: float

    @property
    def number(self) -> int:
        return len(self.base.stretches) if self.base is not None else 0

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
        row = {
            "stretch": len(base.stretches) if base is not None else 0,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_description(),
            "device": rt.device_name,
            "precision": rt.precision,
            "size": args.pretrain_size,
            "lr": args.pretrain_lr,
            "batch_size": args.pretrain_batch_size,
            "augment": bool(args.augment),
            "from_artefact": args.init_autoencoder is not None,
            "fresh_optimizer_moments": args.init_autoencoder is not None,
            "wall_seconds": 0.0,
        }
        return cls(args, base, row, time.monotonic())

    def state(self) -> dict[str, Any]:
        """The stretch's row, with what it started from (``restore`` needs it: the artefact may have been
        rewritten by this very stretch since)."""
        base = None
        if self.base is not None:
            base = {"epochs": self.base.epochs, "stretches": len(self.base.stretches), "best_val_mse": self.floor}
        return {**self.row, "wall_seconds": self.row["wall_seconds"] + time.monotonic() - self.started, "base": base}

    @property
    def floor(self) -> float:
        """The validation MSE the stretch must beat to be exported."""
        return self.base.best_val_mse if self.base is not None else math.inf

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the stretch a state file was written by (``--resume``)."""
        if "stretch" not in state:
            return
        self.row = {k: v for k, v in state["stretch"].items() if k != "base"}
        base = state["stretch"].get("base")
        if self.base is not None and base is not None:
            self.base.history = self.base.history[: base["epochs"]]
            self.base.stretches = self.base.stretches[: base["stretches"]]
            self.base.best_val_mse = float(base["best_val_mse"])

    def export(self, fit_state: FitState) -> None:
        """Write the artefact when this stretch's best beats the one it started from (or there was none)."""
        if not self.args.export_autoencoder or fit_state.best is None:
            return
        if fit_state.best_score >= self.floor:
            logger.info("autoencoder not exported: val MSE %.5f is not below %.5f", fit_state.best_score, self.floor)
            return
        encoder, decoder = split_state(fit_state.best)
        n = self.number
        rows = [{"stretch": n, **r, "epoch": (self.base.epochs if self.base else 0) + r["epoch"]}
                for r in fit_state.history]  # fmt: skip
        stretch = {**self.state(), "epochs": fit_state.epoch, "best_val_mse": fit_state.best_score}
        del stretch["base"]
        save_autoencoder(
            self.args.export_autoencoder,
            AutoencoderArtefact(
                width=self.args.width,
                input_norm=self.args.input_norm,
                encoder=encoder,
                decoder=decoder,
                best_val_mse=fit_state.best_score,
                history=(self.base.history if self.base else []) + rows,
                stretches=(self.base.stretches if self.base else []) + [stretch],
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


# ------------------------------------------------------------------------------------------------- finetune


@dataclass
class FinetuneResult:
    model: CAEClassifier
    model_path: Path
    history: list[dict[str, Any]]
    best_val_loss: float
    phase_seconds: dict[str, float]
    phase_images_per_second: dict[str, float]
    epochs: int


def _phases(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {
            "phase": 1,
            "epochs": args.phase1_epochs,
            "lr": args.phase1_lr,
            "batch_size": args.phase1_batch_size,
            "patience": args.phase1_patience,
            "encoder_trainable": False,
        },
        {
            "phase": 2,
            "epochs": args.phase2_epochs,
            "lr": args.phase2_lr,
            "batch_size": args.phase2_batch_size,
            "patience": args.phase2_patience,
            "encoder_trainable": True,
        },
    ]


def model_card(spec: ModelSpec, provenance: dict[str, Any], version: str) -> ModelCard:
    """A card whose provenance holds plain JSON values only (``torch.load(weights_only=True)`` reads it back)."""
    plain = json.loads(json.dumps(provenance, default=str))
    return ModelCard(spec=spec, class_names=CLASS_NAMES, model_version=version, provenance=plain)


def _phase_done(phase: dict[str, Any], fit_state: FitState) -> bool:
    return fit_state.epoch >= phase["epochs"] or fit_state.bad_epochs >= phase["patience"]


def run_finetune(
    args: argparse.Namespace,
    rt: Runtime,
    data: data_mod.ImageSet,
    deadline: Deadline | None = None,
    head: str | None = None,
    out: Path | None = None,
    provenance: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Gradual unfreezing: phase 1 trains the head on the frozen encoder, phase 2 trains every layer.

    Early stopping per phase on validation loss; the weights with the lowest validation loss over both phases are
    kept (phase 2 starts from phase 1's best, and counts patience against it). ``deadline`` is shared by the two
    phases: phase 1 may use ``args.phase1_share`` of what remains once its features exist.
    """
    out = Path(out or args.out)
    spec = ModelSpec(head=head or args.head, width=args.width, dense_units=args.dense_units, input_norm=args.input_norm)
    state_path, model_path = out / "finetune_state.pt", out / "model.pt"
    seed_everything(args.seed, rt.rank)
    model = CAEClassifier(spec)
    if args.encoder:
        load_encoder(model, args.encoder)
    elif rt.is_main:
        logger.warning("no --encoder: fine-tuning from a randomly initialised encoder (no CAE pretraining)")
    start_phase, progress, opt_state = 1, FitState(), None
    phase_seconds: dict[str, float] = {}
    phase_ips: dict[str, float] = {}
    if args.resume and state_path.is_file():
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        start_phase, progress = state["phase"], _fit_state(state, "best_loss", "best_state")
        phase_seconds, phase_ips = dict(state["phase_seconds"]), dict(state["phase_images_per_second"])
        opt_state = state["optimizer"]
        set_rng_state(state["rng"])
        logger.info("resuming fine-tuning at phase %d after epoch %d from %s", start_phase, progress.epoch, state_path)
    model = rt.prepare(model)
    run = _FinetuneRun(args, rt, data, model, spec, state_path, model_path, dict(provenance or {}))
    run.phase_seconds, run.phase_ips = phase_seconds, phase_ips
    progress = run.phases(start_phase, progress, opt_state, deadline)
    check_replicas_agree(model, rt, "finetune")
    best_state = progress.best if progress.best is not None else cpu_state_dict(model)
    final = CAEClassifier(spec)
    final.load_state_dict(best_state)
    if rt.is_main and progress.history:
        run.save_best(progress)
    rt.barrier()
    return FinetuneResult(
        final, model_path, progress.history, progress.best_score, phase_seconds, phase_ips, len(progress.history)
    )


class _FinetuneRun:
    """The parts of one fine-tuning run that both phases share: data, weights, files."""

    def __init__(
        self,
        args: argparse.Namespace,
        rt: Runtime,
        data: data_mod.ImageSet,
        model: CAEClassifier,
        spec: ModelSpec,
        state_path: Path,
        model_path: Path,
        provenance: dict[str, Any],
    ) -> None:
        self.args, self.rt, self.data, self.model, self.spec = args, rt, data, model, spec
        self.state_path, self.model_path, self.provenance = state_path, model_path, provenance
        self.train_idx, self.val_idx = data.indices("train"), data.indices("val")
        self.weights = None
        if args.balance_sources:
            assert data.sources is not None
            self.weights = independence_weights(data.labels[self.train_idx], data.sources[self.train_idx])
        self.phase_seconds: dict[str, float] = {}
        self.phase_ips: dict[str, float] = {}

    def save_best(self, progress: FitState) -> None:
        best_model = CAEClassifier(self.spec)
        best_model.load_state_dict(progress.best)
        prov = {
            **self.provenance,
            "history": progress.history,
            "best_val_loss": progress.best_score,
            "phase_seconds": self.phase_seconds,
            "phase_images_per_second": self.phase_ips,
        }
        card = model_card(self.spec, prov, self.args.model_version)
        save_classifier(self.model_path, best_model, card, dtype=torch.float16)

    def phases(
        self, start_phase: int, progress: FitState, opt_state: dict[str, Any] | None, deadline: Deadline | None
    ) -> FitState:
        """Run the phases from ``start_phase`` (resumed from ``progress`` and ``opt_state`` when given); the state."""
        for ph in _phases(self.args):
            if ph["phase"] < start_phase:
                continue
            resumed = ph["phase"] == start_phase and opt_state is not None
            if resumed and _phase_done(ph, progress):
                continue
            if not resumed:  # a new phase: patience and epochs from zero, the best so far carried over
                if ph["phase"] == 2 and progress.best is not None:
                    unwrap(self.model).load_state_dict(progress.best)  # phase 2 starts from phase 1's best weights
                progress = FitState(best_score=progress.best_score, best=progress.best, history=progress.history)
            progress = self.phase(ph, progress, opt_state if resumed else None, deadline)
            if Deadline.stop_requested:
                break
        return progress

    def _inputs(self, ph: dict[str, Any]) -> tuple[nn.Module, Inputs, Inputs | None]:
        """The module to train and its training and validation inputs (cached features for phase 1)."""
        args, rt, data = self.args, self.rt, self.data
        if ph["phase"] == 1 and args.phase1_features:
            encoder = unwrap(self.model).encoder
            bank = FeatureBank(encoder, data, torch.cat([self.train_idx, self.val_idx]), rt, args.eval_batch_size)
            self.phase_seconds["phase1_features"] = round(bank.seconds, 2)
            self.phase_ips["phase1_features"] = round(bank.images / bank.seconds, 1) if bank.seconds else 0.0
            if rt.is_main:
                logger.info(
                    "phase1: encoder features of %d images computed once in %.1f s; the head trains on them",
                    bank.images,
                    bank.seconds,
                )
            return rt.wrap(unwrap(self.model).head), bank.inputs, bank.inputs
        return rt.wrap(self.model), image_inputs(data, rt, args.augment, args.augment and args.source_cues), None

    def phase(
        self, ph: dict[str, Any], progress: FitState, opt_state: dict[str, Any] | None, deadline: Deadline | None
    ) -> FitState:
        """Run one phase with ``training.loop.fit``; the state after it."""
        args, rt, model = self.args, self.rt, self.model
        key = f"phase{ph['phase']}"
        unwrap(model).set_encoder_trainable(ph["encoder_trainable"])
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=ph["lr"], fused=rt.device.type == "cuda")
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        started = time.perf_counter()
        net, train_inputs, val_inputs = self._inputs(ph)
        # phase 1's share is of the time left once its features exist, so that they are never computed in vain
        limit = deadline.sub(args.phase1_share * deadline.remaining()) if ph["phase"] == 1 and deadline else deadline

        def train_epoch(epoch: int, until: Deadline | None) -> EpochStats:
            return train_one_epoch(
                net, optimizer, train_inputs, self.train_idx, rt, batch_size=ph["batch_size"],
                seed=args.seed + 1000 * ph["phase"], epoch=epoch, weights=self.weights, deadline=until,
            )  # fmt: skip

        def validate() -> Validation:
            val = evaluate(unwrap(net), self.data, self.val_idx, rt, args.eval_batch_size, inputs=val_inputs)
            return Validation(val.loss, {"val_loss": val.loss, "val_accuracy": val.accuracy})

        def save(state: FitState) -> None:
            save_state(self.state_path, {
                "model": cpu_state_dict(model), "optimizer": optimizer.state_dict(), "phase": ph["phase"],
                **_state_fields(state, "best_loss", "best_state"), "phase_seconds": self.phase_seconds,
                "phase_images_per_second": self.phase_ips, "args": plain_args(args), "rng": rng_state(),
                "spec": self.spec.to_dict(),
            })  # fmt: skip

        phase = Phase(key, ph["epochs"], ph["patience"], args.checkpoint_seconds, tags={"phase": ph["phase"]})
        before = (self.phase_seconds.get(key, 0.0), progress.images, progress.seconds)
        result = fit(
            phase, rt, train_epoch, validate, lambda: cpu_state_dict(model), save, limit, progress,
            on_improve=self.save_best,
        )  # fmt: skip
        state = result.state
        self.phase_seconds[key] = round(before[0] + time.perf_counter() - started, 3)
        images, seconds = state.images - before[1], state.seconds - before[2]
        if images:
            self.phase_ips[key] = round(images / seconds, 1) if seconds else 0.0
        if rt.is_main and state.epoch > 0:  # a phase that ran no epoch leaves the previous phase's state
            save(state)
        return state


# ------------------------------------------------------------------------------------------------- evaluate


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    labels: torch.Tensor
    probabilities: torch.Tensor
    seconds: float


def evaluate_classifier(
    model: nn.Module, data: data_mod.ImageSet, rt: Runtime, split: str = "test", batch_size: int = 256
) -> EvaluateResult:
    """Metrics of ``model`` on one split, computed on this process (the whole split)."""
    module = rt.prepare(unwrap(model)).eval()
    indices = data.indices(split)
    res = evaluate(module, data, indices, rt, batch_size, gather=False)
    metrics = classification_metrics(res.labels, res.probabilities, data.class_names)
    assert data.sources is not None
    metrics["per_source"] = per_source_metrics(
        res.labels, res.probabilities, data.sources[indices].cpu(), data.source_names, data.class_names
    )
    metrics["split"] = split
    metrics["loss"] = res.loss
    metrics["images_per_second"] = round(len(res.labels) / res.seconds, 1) if res.seconds else 0.0
    return EvaluateResult(metrics, res.labels, res.probabilities, res.seconds)


def run_evaluate(args: argparse.Namespace, rt: Runtime, data: data_mod.ImageSet) -> EvaluateResult:
    if not args.model:
        raise SystemExit("evaluate needs --model PATH (a classifier checkpoint, e.g. the finetune model.pt)")
    loaded = load_classifier(args.model)
    result = evaluate_classifier(loaded.model, data, rt, args.split, args.eval_batch_size)
    if rt.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        prov = loaded.card.provenance
        payload = {
            "title": f"cxr-triage evaluation: {Path(args.model).name}",
            "model": str(args.model),
            "model_sha256": loaded.sha256,
            "model_version": loaded.card.model_version,
            "spec": loaded.card.spec.to_dict(),
            "data": data.meta,
            "counts": data.counts(),
            "metrics": result.metrics,
            "facts": {"model sha256": loaded.sha256, "spec": loaded.card.spec.to_dict(), "split": args.split},
            "pretrain_history": prov.get("pretrain_history", []),
            "finetune_history": prov.get("history", []),
            "predictions": predictions_json(result),
        }
        write_json(out / "metrics.json", payload)
        report_from_summary(out, payload)
        _print_metrics(result.metrics)
    return result


def predictions_json(result: EvaluateResult) -> dict[str, Any]:
    """Labels and probabilities as plain lists, so plots can be redrawn from metrics.json alone."""
    return {
        "labels": result.labels.tolist(),
        "probabilities": [[round(p, 6) for p in row] for row in result.probabilities.tolist()],
    }


def _print_metrics(m: dict[str, Any]) -> None:
    print(
        f"{m['split']}: {m['images']} images, accuracy {100 * m['accuracy']:.2f} %, "
        f"macro AUC {100 * m['macro']['auc']:.2f} %, macro F1 {100 * m['macro']['f1']:.2f} %"
    )


# ------------------------------------------------------------------------------------------------- ablation


def run_ablation(
    args: argparse.Namespace,
    rt: Runtime,
    data: data_mod.ImageSet,
    deadline: Deadline | None = None,
    out: Path | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune and test each Table 4 head from the same encoder, on the same split, epochs and time share."""
    out = Path(out or args.out)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = set(heads) - set(HEADS)
    if unknown:
        raise SystemExit(f"unknown head(s) {sorted(unknown)}; expected some of {', '.join(HEADS)}")
    rows: list[dict[str, Any]] = []
    for i, head in enumerate(heads):
        head_deadline = deadline.sub(deadline.remaining() / (len(heads) - i)) if deadline is not None else None
        t0 = time.perf_counter()
        ft = run_finetune(
            args, rt, data, head_deadline, head=head, out=out / head, provenance={"command": "ablation", "head": head}
        )
        ev = evaluate_classifier(ft.model, data, rt, "test", args.eval_batch_size)
        m = ev.metrics
        rows.append(
            {
                "head": head,
                "accuracy": m["accuracy"],
                "precision": m["macro"]["precision"],
                "recall": m["macro"]["recall"],
                "specificity": m["macro"]["specificity"],
                "f1": m["macro"]["f1"],
                "auc": m["macro"]["auc"],
                "best_val_loss": ft.best_val_loss,
                "parameters": keras_parameter_count(ft.model),
                "epochs": ft.epochs,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        if rt.is_main:
            logger.info("ablation %s: test accuracy %.4f, macro AUC %.4f", head, m["accuracy"], m["macro"]["auc"])
        if Deadline.stop_requested:
            break
    if rt.is_main:
        write_json(out / "ablation.json", {"heads": rows, "counts": data.counts(), "args": plain_args(args)})
    return rows


# --------------------------------------------------------------------------------------------------- oneshot


def base_provenance(args: argparse.Namespace, rt: Runtime, data: data_mod.ImageSet) -> dict[str, Any]:
    """What every checkpoint records about how it was made."""
    return {
        "command": " ".join(["python -m training", *sys.argv[1:]]),
        "config": plain_args(args),
        "data": {k: v for k, v in data.meta.items() if k != "load_seconds"},
        "counts": data.counts(),
        "seed": args.seed,
        "device": rt.device_name,
        "world_size": rt.world_size,
        "torch": str(torch.__version__),
    }


class _FileLog:
    """Adds a log file handler on the root logger for the duration of a run."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def __enter__(self) -> _FileLog:
        root = logging.getLogger()
        self.level = root.level
        root.addHandler(self.handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self.level)
        self.handler.close()


def run_oneshot(args: argparse.Namespace, rt: Runtime) -> dict[str, Any]:
    """Pretrain, fine-tune, evaluate (and ablate) within ``--budget-seconds``; everything lands in ``--out``.

    Budget: data loading first; then a reserve for evaluation and plots is set aside, and what is left is shared
    out as it is reached: pretraining ``pretrain_share``, the rest to fine-tuning (phase 1 takes ``phase1_share``
    of it), and with ``--ablation`` the four heads take ``ablation_share`` of the whole. A phase that finishes
    early leaves its time to the next. Every phase checkpoints, so a stop (budget or SIGTERM) loses nothing
    finished; ``--resume`` continues in the same folder.
    """
    started = float(getattr(args, "_startup_seconds", 0.0))
    wall0 = time.perf_counter() - started
    deadline = Deadline(args.budget_seconds, start=time.monotonic() - started)
    Deadline.install_signal_handlers()
    out = Path(args.out)
    work = Path(args.work) if getattr(args, "work", None) else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    with _FileLog(out / "train.log") if rt.is_main else contextlib.nullcontext():
        _log_oneshot_start(args, rt, started)
        data = load_data(args, rt)
        train_deadline, main_deadline = _oneshot_deadlines(args, deadline)
        times = _Times(wall={"load": data.meta["load_seconds"]}, ips={})
        provenance = base_provenance(args, rt, data)
        pre = _oneshot_pretrain(args, rt, data, work, main_deadline, times, provenance)
        if Deadline.stop_requested:
            logger.warning("stopped after pretraining; encoder kept in %s", pre.encoder_path)
            return {"stopped": "signal", "phase": "pretrain"}
        ft_args = argparse.Namespace(**{**vars(args), "encoder": str(pre.encoder_path), "out": str(work / "finetune")})
        ft = _oneshot_finetune(ft_args, rt, data, main_deadline, times, provenance)
        ev = _evaluate_as_shipped(ft.model, args, rt, data, times)
        rows: list[dict[str, Any]] = []
        if args.ablation and not Deadline.stop_requested:
            t0 = time.perf_counter()
            ab_args = argparse.Namespace(**{**vars(ft_args), "out": str(work / "ablation")})
            rows = run_ablation(ab_args, rt, data, train_deadline)
            times.wall["ablation"] = round(time.perf_counter() - t0, 2)
        times.wall["total"] = round(time.perf_counter() - wall0, 2)
        summary: dict[str, Any] = {}
        if rt.is_main:
            sha, size_mib = _save_oneshot_model(out / "model.pt", args, ft, ev, times, provenance)
            summary = _oneshot_summary(args, rt, data, _OneshotParts(pre, ft, ev, rows), times, sha, size_mib)
            write_json(out / "metrics.json", summary)
            report_from_summary(out, summary)
            logger.info(
                "oneshot done in %.1f s: test accuracy %.4f, macro AUC %.4f; outputs in %s",
                times.wall["total"],
                ev.metrics["accuracy"],
                ev.metrics["macro"]["auc"],
                out,
            )
            _print_metrics(ev.metrics)
        rt.barrier()
        return summary


@dataclass
class _Times:
    """Wall seconds and images per second of each step of a one-shot run, in the order the steps ran."""

    wall: dict[str, float]
    ips: dict[str, float]


@dataclass
class _OneshotParts:
    """What the steps of a one-shot run returned."""

    pre: PretrainResult
    ft: FinetuneResult
    ev: EvaluateResult
    ablation: list[dict[str, Any]]


def _log_oneshot_start(args: argparse.Namespace, rt: Runtime, started: float) -> None:
    logger.info("process started %.1f s ago (imports, CUDA set-up): counted in the budget", started)
    logger.info(
        "oneshot: budget %.0f s on %s (%d process(es)); command: %s",
        args.budget_seconds,
        rt.device_name,
        rt.world_size,
        " ".join(sys.argv),
    )


def _oneshot_deadlines(args: argparse.Namespace, deadline: Deadline) -> tuple[Deadline, Deadline]:
    """The training deadline (all but the reserve for evaluation and plots) and, within it, the main run's."""
    reserve = max(args.reserve_seconds, 0.05 * args.budget_seconds)
    train_deadline = deadline.sub(deadline.remaining() - reserve)
    if args.ablation:
        main_deadline = train_deadline.sub((1 - args.ablation_share) * train_deadline.remaining())
    else:
        main_deadline = train_deadline
    return train_deadline, main_deadline


def _oneshot_pretrain(
    args: argparse.Namespace,
    rt: Runtime,
    data: data_mod.ImageSet,
    work: Path,
    deadline: Deadline,
    times: _Times,
    provenance: dict[str, Any],
) -> PretrainResult:
    """Pretrain in ``work/pretrain`` on ``pretrain_share`` of what ``deadline`` leaves; time and history recorded."""
    pre_args = argparse.Namespace(**{**vars(args), "out": str(work / "pretrain")})
    pre = run_pretrain(pre_args, rt, data, deadline.sub(args.pretrain_share * deadline.remaining()))
    times.wall["pretrain"], times.ips["pretrain"] = round(pre.seconds, 2), round(pre.images_per_second, 1)
    provenance.update(
        {"pretrain_history": pre.history, "pretrain_epochs": pre.epochs, "pretrain_best_val_mse": pre.best_val_mse}
    )
    return pre


def _oneshot_finetune(
    ft_args: argparse.Namespace,
    rt: Runtime,
    data: data_mod.ImageSet,
    deadline: Deadline,
    times: _Times,
    provenance: dict[str, Any],
) -> FinetuneResult:
    """Fine-tune (``ft_args`` name the encoder and folder) within ``deadline``; time and speed per phase recorded."""
    # the checkpoints written during fine-tuning record the times so far (the same dicts, filled in as it runs)
    provenance.update({"wall_seconds": times.wall, "images_per_second": times.ips})
    t0 = time.perf_counter()
    ft = run_finetune(ft_args, rt, data, deadline, provenance=provenance)
    times.wall["finetune"] = round(time.perf_counter() - t0, 2)
    times.wall.update({f"finetune_{k}": v for k, v in ft.phase_seconds.items()})
    times.ips.update({f"finetune_{k}": v for k, v in ft.phase_images_per_second.items()})
    return ft


def _evaluate_as_shipped(
    model: CAEClassifier, args: argparse.Namespace, rt: Runtime, data: data_mod.ImageSet, times: _Times
) -> EvaluateResult:
    """Test metrics of the weights as shipped: model.pt stores them in fp16, so ``model`` is rounded in place."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    t0 = time.perf_counter()
    ev = evaluate_classifier(model, data, rt, "test", args.eval_batch_size)
    times.wall["evaluate"] = round(time.perf_counter() - t0, 2)
    times.ips["evaluate"] = ev.metrics["images_per_second"]
    return ev


def _save_oneshot_model(
    path: Path,
    args: argparse.Namespace,
    ft: FinetuneResult,
    ev: EvaluateResult,
    times: _Times,
    provenance: dict[str, Any],
) -> tuple[str, float]:
    """Write the fine-tuned model (fp16) with the whole run's provenance to ``path``; its sha256 and size in MiB."""
    provenance.update(
        {
            "history": ft.history,
            "best_val_loss": ft.best_val_loss,
            "wall_seconds": times.wall,
            "images_per_second": times.ips,
            "test": {"accuracy": ev.metrics["accuracy"], "macro_auc": ev.metrics["macro"]["auc"]},
        }
    )
    card = model_card(ft.model.spec, provenance, args.model_version)
    sha = save_classifier(path, ft.model, card, dtype=torch.float16)
    return sha, path.stat().st_size / (1 << 20)


def _oneshot_summary(
    args: argparse.Namespace,
    rt: Runtime,
    data: data_mod.ImageSet,
    parts: _OneshotParts,
    times: _Times,
    sha: str,
    size_mib: float,
) -> dict[str, Any]:
    """The one-shot run's metrics.json payload (``report_from_summary`` draws report.md and the plots from it)."""
    return {
        "title": "cxr-triage one-shot training run",
        "model": "model.pt",
        "model_sha256": sha,
        "model_mib": round(size_mib, 2),
        "model_version": args.model_version,
        "spec": parts.ft.model.spec.to_dict(),
        "metrics": parts.ev.metrics,
        "ablation": parts.ablation,
        "wall_seconds": times.wall,
        "images_per_second": times.ips,
        "device": rt.device_name,
        "counts": data.counts(),
        "seed": args.seed,
        "budget_seconds": args.budget_seconds,
        "config": plain_args(args),
        "facts": {
            "device": rt.device_name,
            "budget seconds": args.budget_seconds,
            "wall seconds": times.wall,
            "images/s": times.ips,
            "model": f"model.pt ({size_mib:.2f} MiB, sha256 {sha[:16]}...)",
            "spec": parts.ft.model.spec.to_dict(),
            "seed": args.seed,
            "counts": data.counts(),
        },
        "notes": oneshot_notes(args, parts.pre),
        "pretrain_history": parts.pre.history,
        "finetune_history": parts.ft.history,
        "predictions": predictions_json(parts.ev),
    }


def oneshot_notes(args: argparse.Namespace, pre: PretrainResult) -> list[str]:
    notes = [
        f"Pretraining: Adam lr {args.pretrain_lr} (paper 0.01), batch {args.pretrain_batch_size}, "
        f"{pre.epochs} epoch(s){'' if pre.complete else ' (stopped by the time budget)'}.",
        f"Phase 1 (encoder frozen): Adam lr {args.phase1_lr}, batch {args.phase1_batch_size}, "
        f"up to {args.phase1_epochs} epochs, patience {args.phase1_patience}.",
        f"Phase 2 (all layers): Adam lr {args.phase2_lr} (paper 1e-3), batch {args.phase2_batch_size} (paper 16), "
        f"up to {args.phase2_epochs} epochs, patience {args.phase2_patience}.",
        "Convolutions He-initialised before pretraining (PyTorch's default starts in a flat region).",
        "Model kept: lowest validation loss over both phases. The test split was used only for this report.",
        "Metrics are those of the fp16-rounded weights that model.pt holds.",
    ]
    return notes
