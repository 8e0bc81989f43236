"""Fine-tuning by gradual unfreezing: phase 1 trains the head on the frozen encoder, phase 2 every layer.

``run_finetune`` writes under ``--out``: ``model.pt`` (best classifier by validation loss, fp16,
``cxr_triage.ml.checkpoint`` format, updated at every improvement so a stopped run keeps its best model),
``finetune_state.pt`` (resumable: model, optimizer, phase, epoch, best weights, early-stopping counters, args, RNG
state, history, ``--phase2-frozen-blocks``, which a resumed run must repeat) and, while phase 1 lasts,
``phase1_features/`` (the frozen encoder's features computed so far, ``training.features``; removed once phase 1
has ended).

Phase 2 trains every layer (the paper) unless ``--phase2-frozen-blocks N`` keeps the encoder's first N convolution
blocks frozen (``CAEClassifier.set_encoder_trainable``); the value is recorded in the state, the history rows of
phase 2, the stretch row of the classifier artefact and the model's provenance.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_triage import CLASS_NAMES
from cxr_triage.ml.checkpoint import ModelCard, save_classifier
from cxr_triage.ml.model import CAEClassifier, ModelSpec
from training import data as data_mod
from training.classifier import ClassifierStretch
from training.data import independence_weights
from training.engine import (
    Deadline,
    EpochStats,
    Inputs,
    Runtime,
    Within,
    check_replicas_agree,
    cpu_state_dict,
    evaluate,
    image_inputs,
    load_state,
    plain_args,
    rng_state,
    save_state,
    seed_everything,
    set_rng_state,
    train_one_epoch,
    unwrap,
)
from training.features import FOLDER as FEATURES_FOLDER
from training.features import FeatureBank, FeatureStore, bank_identity, remove_bank
from training.loop import FitState, Phase, Validation, fit, fit_state_from, state_fields
from training.pretrain import load_encoder

logger = logging.getLogger(__name__)


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
            "frozen_blocks": 0,  # the encoder is frozen whole
            "tags": {"phase": 1},
        },
        {
            "phase": 2,
            "epochs": args.phase2_epochs,
            "lr": args.phase2_lr,
            "batch_size": args.phase2_batch_size,
            "patience": args.phase2_patience,
            "encoder_trainable": True,
            "frozen_blocks": args.phase2_frozen_blocks,
            "tags": {"phase": 2, "frozen_blocks": args.phase2_frozen_blocks},
        },
    ]


def model_card(spec: ModelSpec, provenance: dict[str, Any], version: str) -> ModelCard:
    """A card whose provenance holds plain JSON values only (``torch.load(weights_only=True)`` reads it back)."""
    plain = json.loads(json.dumps(provenance, default=str))
    return ModelCard(spec=spec, class_names=CLASS_NAMES, model_version=version, provenance=plain)


def _phase_done(phase: dict[str, Any], fit_state: FitState) -> bool:
    return fit_state.epoch >= phase["epochs"] or fit_state.bad_epochs >= phase["patience"]


def _refuse_other_frozen_blocks(state: dict[str, Any], args: argparse.Namespace, state_path: Path) -> None:
    """A run resumes only with the ``--phase2-frozen-blocks`` it was started with (states before it: 0)."""
    saved = int(state.get("phase2_frozen_blocks", 0))
    if saved != args.phase2_frozen_blocks:
        raise SystemExit(
            f"{state_path}: this run was started with --phase2-frozen-blocks {saved}, not "
            f"{args.phase2_frozen_blocks}; resume it with --phase2-frozen-blocks {saved}, or start a new run "
            "(another --out, or without --resume)"
        )


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
    if args.encoder and not getattr(args, "init_classifier", None):
        load_encoder(model, args.encoder)
    elif not getattr(args, "init_classifier", None) and rt.is_main:
        logger.warning("no --encoder: fine-tuning from a randomly initialised encoder (no CAE pretraining)")
    start_phase, progress, opt_state = 1, FitState(), None
    phase_seconds: dict[str, float] = {}
    phase_ips: dict[str, float] = {}
    stretch = ClassifierStretch.start(args, rt, model)
    if args.resume and state_path.is_file():
        state = load_state(state_path)
        _refuse_other_frozen_blocks(state, args, state_path)
        model.load_state_dict(state["model"])
        start_phase, progress = state["phase"], fit_state_from(state, "best_loss", "best_state")
        phase_seconds, phase_ips = dict(state["phase_seconds"]), dict(state["phase_images_per_second"])
        opt_state = state["optimizer"]
        set_rng_state(state["rng"])
        stretch.restore(state.get("stretch"))
        logger.info("resuming fine-tuning at phase %d after epoch %d from %s", start_phase, progress.epoch, state_path)
    model = rt.prepare(model)
    run = _FinetuneRun(args, rt, data, model, spec, state_path, model_path, dict(provenance or {}), stretch)
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
    """The parts of one fine-tuning run that both phases share: data, weights, files, the stretch it is."""

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
        stretch: ClassifierStretch,
    ) -> None:
        self.args, self.rt, self.data, self.model, self.spec = args, rt, data, model, spec
        self.state_path, self.model_path, self.provenance = state_path, model_path, provenance
        self.stretch = stretch
        self.train_idx, self.val_idx = data.indices("train"), data.indices("val")
        self.weights = None
        if args.balance_sources:
            assert data.sources is not None
            self.weights = independence_weights(data.labels[self.train_idx], data.sources[self.train_idx])
        self.phase_seconds: dict[str, float] = {}
        self.phase_ips: dict[str, float] = {}
        self.features_unfinished = False  # phase 1 stopped while computing its features: nothing trained

    def save_best(self, progress: FitState) -> None:
        best_model = CAEClassifier(self.spec)
        best_model.load_state_dict(progress.best)
        prov = {
            **self.provenance,
            "history": progress.history,
            "best_val_loss": progress.best_score,
            "phase_seconds": self.phase_seconds,
            "phase_images_per_second": self.phase_ips,
            "phase2_frozen_blocks": self.args.phase2_frozen_blocks,
        }
        card = model_card(self.spec, prov, self.args.model_version)
        save_classifier(self.model_path, best_model, card, dtype=torch.float16)
        if self.stretch.export(progress.history, progress.best_score, best_model, card):
            logger.info("classifier exported to %s (val loss %.4f)", self.args.export_classifier, progress.best_score)

    def phases(
        self, start_phase: int, progress: FitState, opt_state: dict[str, Any] | None, deadline: Deadline | None
    ) -> FitState:
        """Run the phases from ``start_phase`` (resumed from ``progress`` and ``opt_state`` when given); the state."""
        for ph in _phases(self.args):
            if ph["phase"] < start_phase:
                continue
            if ph["phase"] == 2:
                self.drop_features()  # phase 1 has ended (a crash may have left its features behind)
            resumed = ph["phase"] == start_phase and opt_state is not None
            if ph["epochs"] <= 0:  # e.g. --phase1-epochs 0 when continuing a classifier artefact in phase 2
                continue
            if resumed and _phase_done(ph, progress):
                continue
            if not resumed:  # a new phase: patience and epochs from zero, the best so far carried over
                if ph["phase"] == 2 and progress.best is not None:
                    unwrap(self.model).load_state_dict(progress.best)  # phase 2 starts from phase 1's best weights
                progress = FitState(best_score=progress.best_score, best=progress.best, history=progress.history)
            progress = self.phase(ph, progress, opt_state if resumed else None, deadline)
            if Deadline.stop_requested or self.features_unfinished:
                break
        return progress

    def _inputs(self, ph: dict[str, Any], deadline: Deadline | None) -> tuple[nn.Module, Inputs, Inputs | None]:
        """The module to train and its training and validation inputs (cached features for phase 1; their
        computation stops at ``deadline`` or SIGTERM, and then ``features_unfinished`` is set)."""
        args, rt, data = self.args, self.rt, self.data
        if ph["phase"] == 1 and args.phase1_features:
            encoder, idx = unwrap(self.model).encoder, torch.cat([self.train_idx, self.val_idx])
            store = self._feature_store(encoder, idx)
            bank = FeatureBank(encoder, data, idx, rt, args.eval_batch_size, store, deadline or Deadline())
            self.features_unfinished = not bank.complete
            self.phase_seconds["phase1_features"] = round(bank.seconds, 2)
            self.phase_ips["phase1_features"] = round(bank.images / bank.seconds, 1) if bank.seconds else 0.0
            if rt.is_main:
                logger.info(
                    "phase1: encoder features of %d images (%d of %d batches loaded from %s, %d computed) in %.1f s%s",
                    bank.images, bank.loaded_batches, bank.total_batches, store.folder, bank.computed_batches,
                    bank.seconds, "" if bank.complete else "; stopped before the last: --resume continues them",
                )  # fmt: skip
            return rt.wrap(unwrap(self.model).head), bank.inputs, bank.inputs
        return rt.wrap(self.model), image_inputs(data, rt, args.augment, args.augment and args.source_cues), None

    def _feature_store(self, encoder: nn.Module, idx: torch.Tensor) -> FeatureStore:
        """Phase 1's features on disk in the state folder: loaded on ``--resume`` when computed from the same."""
        dtype = "bfloat16" if self.rt.amp else "float32"
        identity = bank_identity(encoder, self.spec.to_dict(), self.data.images, idx, self.args.eval_batch_size, dtype)
        folder = self.state_path.parent / FEATURES_FOLDER
        return FeatureStore(folder, identity, idx.cpu(), every=self.args.checkpoint_seconds,
                            resume=bool(self.args.resume), writer=self.rt.is_main)  # fmt: skip

    def drop_features(self) -> None:
        """Phase 1 has ended: its features on disk are not needed again."""
        if self.rt.is_main and remove_bank(self.state_path.parent / FEATURES_FOLDER):
            logger.info("phase 1 has ended: removed its features from %s", self.state_path.parent / FEATURES_FOLDER)

    def phase(
        self, ph: dict[str, Any], progress: FitState, opt_state: dict[str, Any] | None, deadline: Deadline | None
    ) -> FitState:
        """Run one phase with ``training.loop.fit``; the state after it."""
        args, rt, model = self.args, self.rt, self.model
        key = f"phase{ph['phase']}"
        unwrap(model).set_encoder_trainable(ph["encoder_trainable"], ph["frozen_blocks"])
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=ph["lr"], fused=rt.device.type == "cuda")
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        started = time.perf_counter()
        net, train_inputs, val_inputs = self._inputs(ph, deadline)
        if self.features_unfinished:
            self.phase_seconds[key] = round(self.phase_seconds.get(key, 0.0) + time.perf_counter() - started, 3)
            return progress
        # phase 1's share is of the time left once its features exist, so that they are never computed in vain
        limit = deadline.sub(args.phase1_share * deadline.remaining()) if ph["phase"] == 1 and deadline else deadline

        def train_epoch(epoch: int, until: Deadline | None, within: Within) -> EpochStats:
            return train_one_epoch(
                net, optimizer, train_inputs, self.train_idx, rt, batch_size=ph["batch_size"],
                seed=args.seed + 1000 * ph["phase"], epoch=epoch, weights=self.weights, deadline=until, within=within,
            )  # fmt: skip

        def validate() -> Validation:
            val = evaluate(unwrap(net), self.data, self.val_idx, rt, args.eval_batch_size, inputs=val_inputs)
            return Validation(val.loss, {"val_loss": val.loss, "val_accuracy": val.accuracy})

        def save(state: FitState) -> None:
            save_state(self.state_path, {
                "model": cpu_state_dict(model), "optimizer": optimizer.state_dict(), "phase": ph["phase"],
                **state_fields(state, "best_loss", "best_state"), "phase_seconds": self.phase_seconds,
                "phase_images_per_second": self.phase_ips, "args": plain_args(args), "rng": rng_state(),
                "spec": self.spec.to_dict(), "stretch": self.stretch.state(),
                "phase2_frozen_blocks": args.phase2_frozen_blocks,
            })  # fmt: skip

        phase = Phase(key, ph["epochs"], ph["patience"], args.checkpoint_seconds, tags=ph["tags"])
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
        if ph["phase"] == 1 and result.complete:
            self.drop_features()
        return state
