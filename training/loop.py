"""The one training loop: epochs, the time budget, early stopping, the best weights, checkpoints and resuming.

``fit`` runs one phase (CAE pretraining, or one fine-tuning phase) given two callables, ``train_epoch(epoch,
deadline) -> EpochStats`` and ``validate() -> Validation``. It owns everything around them:

- epochs up to ``Phase.epochs``; with ``Phase.patience``, early stopping when the validation score has not
  improved for that many epochs;
- the deadline: another epoch starts while at least ``MIN_EPOCH_SHARE`` of one still fits (the deadline cuts it
  short inside, every 20 steps), and SIGTERM stops it the same way; decisions are all-reduced under DDP;
- the best weights: ``snapshot()`` is taken at every improvement, and ``on_improve`` runs (fine-tuning writes its
  best model there, so a stopped run keeps it);
- checkpoints: ``save(state)`` at most every ``checkpoint_seconds``, inside an epoch too (``state.partial`` then
  says how far the epoch got: ``engine.EpochProgress``), and at the end of the phase; ``state`` is a ``FitState``
  whose ``to_dict`` goes into the caller's state file, and ``fit(..., resume=FitState.from_dict(d))`` continues
  where it stopped, mid-epoch included (the optimizer and RNG are restored by the caller, who owns them).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from training.engine import Deadline, EpochProgress, EpochStats, Runtime, Within

logger = logging.getLogger(__name__)

MIN_EPOCH_SHARE = 0.25
"""Another epoch starts while at least this share of one still fits before the deadline; the deadline then cuts it
short, so on a slow machine the last partial epoch still trains instead of idling."""


@dataclass(frozen=True)
class Phase:
    """What ``fit`` needs to know about a phase besides its callables."""

    name: str  # "pretrain", "phase1", "phase2": log lines
    epochs: int
    patience: int | None = None  # None: no early stopping
    checkpoint_seconds: float = 30.0
    tags: dict[str, Any] = field(default_factory=dict)  # added to every history row (e.g. {"phase": 2})


@dataclass(frozen=True)
class Validation:
    """A validation pass: ``score`` is minimised (loss or MSE); ``extra`` goes into the history row."""

    score: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class FitState:
    """Where a phase stands; plain values and tensors only (written with ``torch.save``)."""

    epoch: int = 0
    bad_epochs: int = 0
    best_score: float = math.inf
    best: Any = None  # the snapshot taken at the best epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    partial: dict[str, Any] | None = None  # an interrupted epoch's EpochProgress; None between epochs

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitState:
        known = {k: data[k] for k in vars(cls()) if k in data}
        return cls(**known)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class FitResult:
    state: FitState
    complete: bool  # every epoch ran (not stopped by the budget, a signal or divergence)
    stopped_early: bool  # early stopping on patience


def _fits_another_epoch(deadline: Deadline | None, last_epoch_seconds: float, rt: Runtime) -> bool:
    if deadline is None:
        return not rt.any(Deadline.stop_requested)
    too_late = deadline.expired() or (
        last_epoch_seconds > 0 and deadline.remaining() < MIN_EPOCH_SHARE * last_epoch_seconds
    )
    return not rt.any(too_late)


def fit(
    phase: Phase,
    rt: Runtime,
    train_epoch: Callable[[int, Deadline | None, Within], EpochStats],
    validate: Callable[[], Validation],
    snapshot: Callable[[], Any],
    save: Callable[[FitState], None],
    deadline: Deadline | None = None,
    resume: FitState | None = None,
    on_improve: Callable[[FitState], None] | None = None,
) -> FitResult:
    """Run ``phase`` (module docstring); the final state, and whether it ran to its last epoch."""
    state = resume or FitState()
    started_at = state.epoch
    last_save, last_epoch_seconds = time.monotonic(), 0.0
    diverged = patience_hit = False
    while state.epoch < phase.epochs:
        if phase.patience is not None and state.bad_epochs >= phase.patience:
            patience_hit = True
            break
        if not _fits_another_epoch(deadline, last_epoch_seconds, rt):
            logger.info("%s: stopping before epoch %d to stay within the time budget", phase.name, state.epoch + 1)
            break
        e0 = time.perf_counter()
        within = _within(state, phase, save, last_save)
        stats = train_epoch(state.epoch, deadline, within)
        last_save = within.last
        state.partial = None  # an epoch cut short by the budget or a signal counts as done, as before
        result = validate()
        state.epoch += 1
        last_epoch_seconds = time.perf_counter() - e0
        state.images += stats.images
        state.seconds += stats.seconds
        if not math.isfinite(stats.loss):
            logger.error(
                "%s diverged at epoch %d (loss %s): lower the learning rate", phase.name, state.epoch, stats.loss
            )
            diverged = True
            break
        improved = _record_epoch(phase, state, stats, result, snapshot)
        if rt.is_main:
            _log_epoch(phase, state, stats, result, improved)
            if improved and on_improve is not None:
                on_improve(state)
            if time.monotonic() - last_save >= phase.checkpoint_seconds:
                save(state)
                last_save = time.monotonic()
        if stats.stopped_early:
            logger.warning("%s stopped inside epoch %d by the time budget or a signal", phase.name, state.epoch)
            break
    if phase.patience is not None and state.bad_epochs >= phase.patience:
        patience_hit = True
        if rt.is_main:
            logger.info("%s: early stop, validation did not improve for %d epochs", phase.name, state.bad_epochs)
    if rt.is_main and state.epoch > started_at:
        save(state)
    complete = not diverged and (state.epoch >= phase.epochs or patience_hit)
    return FitResult(state=state, complete=complete, stopped_early=patience_hit)


def _within(state: FitState, phase: Phase, save: Callable[[FitState], None], last_save: float) -> Within:
    """Checkpoints inside the next epoch: resume it where ``state.partial`` says, save with the progress."""

    def save_partial(progress: EpochProgress) -> None:
        state.partial = progress.to_dict()
        save(state)

    start = EpochProgress.from_dict(state.partial) if state.partial else None
    return Within(start=start, save=save_partial, every=phase.checkpoint_seconds, last=last_save)


def _record_epoch(
    phase: Phase, state: FitState, stats: EpochStats, result: Validation, snapshot: Callable[[], Any]
) -> bool:
    """Book a finished epoch into ``state`` (best score and weights, or one more bad epoch; its history row).

    Returns whether the epoch improved on the best validation score.
    """
    improved = result.score < state.best_score
    if improved:
        state.best_score, state.bad_epochs, state.best = result.score, 0, snapshot()
    else:
        state.bad_epochs += 1
    row = {**phase.tags, "epoch": state.epoch, "train_loss": stats.loss, **result.extra, "best": improved}
    row.update(_speed(stats))
    if stats.accuracy is not None:
        row["train_accuracy"] = stats.accuracy
    state.history.append(row)
    return improved


def _speed(stats: EpochStats) -> dict[str, float]:
    return {
        "images": stats.images,
        "seconds": round(stats.seconds, 3),
        "images_per_second": round(stats.images_per_second, 1),
    }


def _log_epoch(phase: Phase, state: FitState, stats: EpochStats, result: Validation, improved: bool) -> None:
    extra = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in result.extra.items())
    accuracy = f" acc {stats.accuracy:.4f}" if stats.accuracy is not None else ""
    logger.info(
        "%s epoch %d/%d: train loss %.5f%s, %s%s, %.1f s, %s images/s",
        phase.name,
        state.epoch,
        phase.epochs,
        stats.loss,
        accuracy,
        extra,
        " (best)" if improved else "",
        stats.seconds,
        f"{stats.images_per_second:,.0f}",
    )


def fit_state_from(state: dict[str, Any], score_key: str, best_key: str) -> FitState:
    """The FitState kept in a state file (``state_fields`` wrote it)."""
    return FitState(
        epoch=state["epoch"],
        bad_epochs=state.get("bad_epochs", 0),
        best_score=state[score_key],
        best=state.get(best_key),
        history=list(state["history"]),
        seconds=state.get("fit_seconds", 0.0),
        images=state.get("fit_images", 0),
        partial=state.get("partial"),
    )


def state_fields(fit_state: FitState, score_key: str, best_key: str) -> dict[str, Any]:
    """A FitState as the documented keys of a state file (epoch, bad_epochs, the best score and weights)."""
    return {
        "epoch": fit_state.epoch,
        "bad_epochs": fit_state.bad_epochs,
        score_key: fit_state.best_score,
        best_key: fit_state.best,
        "history": fit_state.history,
        "fit_seconds": fit_state.seconds,
        "fit_images": fit_state.images,
        "partial": fit_state.partial,
    }
