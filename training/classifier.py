"""The classifier's fine-tuning as a committed artefact, accumulated across runs like the autoencoder's pretraining.

Fine-tuning the paper's full-width network takes hours on the 2-core machines here (phase 2 trains every layer at
224x224), so it accumulates the same way pretraining does (``training.autoencoder``): each ``finetune`` run (a
*stretch*) may start from the artefact (``--init-classifier``) and writes it again (``--export-classifier``) only
when its best validation loss is below the artefact's. Adam's moments are not kept in the artefact: a stretch that
starts from it starts with fresh optimiser moments. Inside one stretch, ``--resume`` continues from the resumable
state in ``--out`` (moments included, mid-epoch included).

The artefact is an ordinary classifier checkpoint (``cxr_triage.ml.checkpoint``, fp16 weights, loadable by
``classify`` and the registry as a candidate); its provenance gains ``accumulated`` (format
``cxr-triage-classifier-history/1``):

- ``best_val_loss``: validation loss (the whole validation split) of these weights;
- ``history``: one row per epoch over all stretches (stretch, phase, epoch, losses, validation accuracy, seconds,
  images/s; phase 2's rows also ``frozen_blocks``);
- ``stretches``: one row per stretch (machine and its bf16 hardware, device, precision, each phase's lr, batch and
  epochs, phase 2's ``frozen_blocks`` (``--phase2-frozen-blocks``), wall seconds, start time, whether it began from
  the artefact with fresh optimiser moments, the encoder it began from and that encoder's pretraining epochs and
  validation MSE, best validation loss).

Who changes what: ``training.finetune.run_finetune`` reads the artefact at the start of a stretch and calls
``ClassifierStretch.export`` at each improvement; nothing else writes it. What a stretch's state is and who changes
it is shared with the autoencoder's pretraining: ``training.stretch``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from cxr_triage.ml.checkpoint import CheckpointError, ModelCard, load_classifier, save_classifier
from cxr_triage.ml.model import CAEClassifier
from training.engine import Runtime
from training.stretch import Stretch, new_row

FORMAT = "cxr-triage-classifier-history/1"


def encoder_origin(path: str | None) -> dict[str, Any] | None:
    """What the encoder a stretch starts from says about its pretraining (autoencoder artefact or encoder.pt)."""
    if not path:
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    history = payload.get("history", []) if isinstance(payload, dict) else []
    best = payload.get("best_val_mse") if isinstance(payload, dict) else None
    return {"path": str(path), "epochs": len(history), "best_val_mse": best}


def accumulated(card: ModelCard) -> dict[str, Any] | None:
    """The accumulated history a checkpoint carries, or None for a checkpoint that was not an artefact."""
    value = card.provenance.get("accumulated")
    return value if isinstance(value, dict) and value.get("format") == FORMAT else None


class ClassifierStretch(Stretch[dict[str, Any]]):
    """This fine-tuning run as one stretch of the committed classifier's history (module docstring).

    ``base`` is the ``accumulated`` record of the checkpoint it started from (or of a plain checkpoint's own
    history, as stretch 0); the resumable state keeps the whole record.
    """

    def prior_history(self) -> list[dict[str, Any]]:
        return self.base["history"] if self.base is not None else []

    def prior_stretches(self) -> list[dict[str, Any]]:
        return self.base["stretches"] if self.base is not None else []

    @property
    def floor(self) -> float:
        """The validation loss this stretch must beat to be exported."""
        return float(self.base["best_val_loss"]) if self.base is not None else math.inf

    def base_state(self) -> dict[str, Any] | None:
        return self.base

    def _restore_base(self, saved: dict[str, Any] | None) -> None:
        self.base = saved

    @classmethod
    def start(cls, args: argparse.Namespace, rt: Runtime, model: CAEClassifier) -> ClassifierStretch:
        """Load ``--init-classifier`` into ``model`` (same spec) and begin this stretch's row."""
        base = None
        init = getattr(args, "init_classifier", None)
        if init:
            try:
                loaded = load_classifier(init)
            except CheckpointError as exc:
                raise SystemExit(str(exc)) from exc
            if loaded.card.spec != model.spec:
                raise SystemExit(f"{init}: its model is {loaded.card.spec}, this run builds {model.spec}")
            model.load_state_dict(loaded.model.state_dict())
            base = accumulated(loaded.card) or _history_of_plain(loaded.card)
        number = len(base["stretches"]) if base is not None else 0
        origin = {"encoder": None if init else encoder_origin(args.encoder)}
        row = new_row(number, rt, {"phases": _phase_rows(args)}, bool(init), origin)
        return cls(args, base, row, time.monotonic())

    def restore(self, saved: dict[str, Any] | None) -> None:
        """As ``Stretch.restore``; the clock of this process's part of the stretch restarts here."""
        super().restore(saved)
        if saved:
            self.started = time.monotonic()

    def export(self, history: list[dict[str, Any]], best_loss: float, model: CAEClassifier, card: ModelCard) -> bool:
        """Write the artefact when this stretch's best beats the one it started from; whether it was written."""
        path = getattr(self.args, "export_classifier", None)
        if not path or best_loss >= self.floor:
            return False
        n, before = self.number, len(self.prior_history())
        rows = [{**r, "stretch": n, "epoch_overall": before + i + 1} for i, r in enumerate(history)]
        all_rows, stretches = self.accumulate(rows, len(history), "best_val_loss", best_loss)
        record = {"format": FORMAT, "best_val_loss": best_loss, "history": all_rows, "stretches": stretches}
        provenance = {**card.provenance, "accumulated": record}
        save_classifier(path, model, ModelCard(card.spec, card.class_names, card.model_version, provenance=provenance))
        return True


def _phase_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each phase's settings as the stretch row keeps them; phase 2's ``frozen_blocks`` is
    ``--phase2-frozen-blocks`` (0: every layer trained, the paper)."""
    rows = [
        {"phase": p, "lr": getattr(args, f"phase{p}_lr"), "batch_size": getattr(args, f"phase{p}_batch_size"),
         "max_epochs": getattr(args, f"phase{p}_epochs")}
        for p in (1, 2)
    ]  # fmt: skip
    rows[1]["frozen_blocks"] = args.phase2_frozen_blocks
    return rows


def _history_of_plain(card: ModelCard) -> dict[str, Any]:
    """A checkpoint from a run before artefacts existed: its own history becomes stretch 0."""
    history = list(card.provenance.get("history", []))
    best = float(card.provenance.get("best_val_loss", math.inf))
    stretch = {"stretch": 0, "machine": "unknown (written before the artefact format)", "epochs": len(history),
               "best_val_loss": best}  # fmt: skip
    return {"format": FORMAT, "best_val_loss": best, "history": history, "stretches": [stretch]}
