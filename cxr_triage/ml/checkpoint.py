"""Checkpoint files: the weights plus everything needed to rebuild and trust the model.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, loaded with
``torch.load(weights_only=True)`` so that opening a file never executes code from it. Its sha256 is computed on
load and reported with every prediction.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxr_triage import BUNDLED_MODEL, CLASS_NAMES
from cxr_triage.files import file_sha256, write_atomic
from cxr_triage.ml.imaging import preprocessing_version
from cxr_triage.ml.model import CAEClassifier, ModelSpec

FORMAT = "cxr-triage-checkpoint/1"


class CheckpointError(ValueError):
    """The file is not a cxr-triage classifier checkpoint, or does not match this code."""


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about itself."""

    spec: ModelSpec
    class_names: tuple[str, ...] = CLASS_NAMES
    model_version: str = "unversioned"
    preprocessing_version: str = ""
    """The pixel pipeline the model was trained with; empty: the one its spec's ``input_norm`` implies."""
    provenance: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    """Temperature scaling fitted on the validation split: probabilities are ``softmax(logits / temperature)``."""

    def __post_init__(self) -> None:
        if not self.preprocessing_version:
            object.__setattr__(self, "preprocessing_version", preprocessing_version(self.spec.input_norm))
        if len(self.class_names) != self.spec.num_classes:
            raise CheckpointError(
                f"{len(self.class_names)} class names for a model with {self.spec.num_classes} outputs"
            )
        if not (0.05 <= self.temperature <= 20.0):
            raise CheckpointError(f"temperature {self.temperature} is outside 0.05..20")


@dataclass(frozen=True)
class LoadedModel:
    model: CAEClassifier
    card: ModelCard
    sha256: str
    path: Path | None


def save_classifier(
    path: str | os.PathLike[str],
    model: CAEClassifier,
    card: ModelCard,
    dtype: torch.dtype | None = torch.float16,
) -> str:
    """Write a classifier checkpoint (fp16 weights by default) atomically; return its sha256."""
    state = {
        k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
    }
    payload = {
        "format": FORMAT,
        "kind": "classifier",
        "spec": card.spec.to_dict(),
        "class_names": list(card.class_names),
        "model_version": card.model_version,
        "preprocessing_version": card.preprocessing_version,
        "provenance": card.provenance,
        "temperature": float(card.temperature),
        "state_dict": state,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_atomic(path, buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def load_classifier(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a classifier checkpoint without executing code from it; weights come back as float32."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("kind") != "classifier":
        raise CheckpointError(f"{path}: not a {FORMAT} classifier checkpoint")
    card = ModelCard(
        spec=ModelSpec.from_dict(payload["spec"]),
        class_names=tuple(payload["class_names"]),
        model_version=str(payload["model_version"]),
        preprocessing_version=str(payload["preprocessing_version"]),
        provenance=dict(payload.get("provenance") or {}),
        temperature=float(payload.get("temperature", 1.0)),  # checkpoints written before calibration have none
    )
    expected = preprocessing_version(card.spec.input_norm)
    if card.preprocessing_version != expected:
        raise CheckpointError(
            f"{path}: trained with preprocessing {card.preprocessing_version}, this code runs {expected} for it"
        )
    model = CAEClassifier(card.spec)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match {card.spec}: {exc}") from exc
    model.eval()
    return LoadedModel(model=model, card=card, sha256=file_sha256(path), path=path)


def resolve_model_path(
    path: str | os.PathLike[str] | None,
    how: str = "pass it with --model PATH or set [model] path in the configuration (--config FILE)",
) -> Path:
    """The checkpoint to use: the given path, else the bundled model; explains how to get one if neither exists.

    ``how`` tells the user how the calling command takes a model path.
    """
    candidate = Path(path) if path else BUNDLED_MODEL
    if not candidate.is_file():
        if path:
            where = f"{candidate.resolve()} does not exist"
        else:
            where = (
                f"the bundled model {BUNDLED_MODEL} is missing (it ships with the repository: is this a complete "
                "clone, and was the package installed from it with `pip install -e .`?)"
            )
        raise CheckpointError(
            f"no model: {where}. Use the bundled model, or train one with `python -m training oneshot` "
            f"(docs/TRAINING.md) and {how}."
        )
    return candidate
