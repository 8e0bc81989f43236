"""The pretrained autoencoder as a committed artefact: encoder + decoder in fp16 with the whole training history.

Pretraining the paper's autoencoder takes tens of hours on the 2-core machines this project is developed on, so it
accumulates across runs and machines: each run (a *stretch*) starts from the artefact (``--init-autoencoder``),
trains some epochs and writes the artefact again (``--export-autoencoder``) only when its best validation MSE is
lower than the artefact's. Adam's moments are not kept in the artefact (it would triple its size): a stretch that
starts from it starts with fresh optimiser moments. Inside one stretch, ``--resume`` continues from the resumable
state in the ``--out`` folder with the moments.

Who changes what: ``run_pretrain`` (``training.pretrain``) reads the artefact at the start of a stretch and calls
``save_autoencoder`` when the stretch improved on it; nothing else writes it.

File format ``cxr-triage-autoencoder/1`` (``torch.save``, loaded with ``weights_only=True``):

- ``width``, ``input_norm``: the ``ModelSpec`` fields the weights belong to;
- ``encoder``, ``decoder``: state dicts in fp16;
- ``best_val_mse``: validation MSE (224x224, fixed validation subset) of these weights;
- ``history``: one row per epoch over all stretches (stretch, epoch, size, train/val MSE, seconds, images/s);
- ``stretches``: one row per stretch (machine, device, precision, side, lr, batch, epochs, wall seconds, start
  time, whether it started from the artefact with fresh optimiser moments, best validation MSE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from cxr_triage.files import write_atomic
from cxr_triage.ml.model import ConvAutoencoder

FORMAT = "cxr-triage-autoencoder/1"


class AutoencoderFileError(ValueError):
    """The file is not an autoencoder artefact, or does not fit the model it is loaded into."""


@dataclass
class AutoencoderArtefact:
    """What an artefact file holds, weights in float32 once loaded."""

    width: int
    input_norm: str
    encoder: dict[str, torch.Tensor]
    decoder: dict[str, torch.Tensor]
    best_val_mse: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stretches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.history)

    def load_into(self, model: ConvAutoencoder) -> None:
        if model.encoder.input_norm != self.input_norm:
            raise AutoencoderFileError(
                f"the artefact was trained with input_norm {self.input_norm!r}, the model has "
                f"{model.encoder.input_norm!r}"
            )
        try:
            model.encoder.load_state_dict(self.encoder)
            model.decoder.load_state_dict(self.decoder)
        except RuntimeError as exc:
            raise AutoencoderFileError(f"the artefact (width {self.width}) does not fit the model: {exc}") from exc


def load_autoencoder(path: str | os.PathLike[str]) -> AutoencoderArtefact:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AutoencoderFileError(f"{path}: not a {FORMAT} file")
    return AutoencoderArtefact(
        width=int(payload["width"]),
        input_norm=str(payload["input_norm"]),
        encoder={k: v.float() for k, v in payload["encoder"].items()},
        decoder={k: v.float() for k, v in payload["decoder"].items()},
        best_val_mse=float(payload["best_val_mse"]),
        history=list(payload["history"]),
        stretches=list(payload["stretches"]),
    )


def save_autoencoder(path: str | os.PathLike[str], artefact: AutoencoderArtefact) -> None:
    """Write the artefact atomically, weights in fp16."""
    payload = {
        "format": FORMAT,
        "width": artefact.width,
        "input_norm": artefact.input_norm,
        "encoder": {k: v.detach().cpu().half() for k, v in artefact.encoder.items()},
        "decoder": {k: v.detach().cpu().half() for k, v in artefact.decoder.items()},
        "best_val_mse": artefact.best_val_mse,
        "history": artefact.history,
        "stretches": artefact.stretches,
    }
    write_atomic(path, lambda fh: torch.save(payload, fh))


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A ConvAutoencoder state dict as (encoder, decoder) state dicts."""
    enc = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    dec = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    return enc, dec
