"""One *stretch* of an accumulated artefact's history: what pretraining and fine-tuning share.

The committed autoencoder (``training.autoencoder``) and classifier (``training.classifier``) accumulate across
runs and machines: each run is a stretch that may start from the artefact, trains, and writes it back only when its
best validation figure (MSE, loss) is below the artefact's. ``Stretch`` is that run's part of the history: ``row``
(machine and its bf16 hardware, device, precision, the run's settings, wall seconds) and ``base``, the history it
started from. Each artefact keeps its own file format; a subclass says how its ``base`` reads
(``prior_history``, ``prior_stretches``, ``floor``) and what the resumable state keeps of it (``base_state``,
``_restore_base``).

Who changes which state:

- ``start`` (each subclass's classmethod), once at the start of a run: loads the artefact the run was given into
  the model and sets ``base``, ``row`` and the clock (``started``);
- ``restore``, once when ``--resume`` finds a resumable state: replaces ``row`` and ``base`` by those the state was
  written with, so a stretch continued in another process is still one stretch, counted once;
- ``state`` and ``accumulate`` only read: the run's ``save`` stores ``state()`` in its resumable state, and the
  subclass's ``export`` writes the artefact file from ``accumulate``. ``export`` is the only writer of the artefact
  (``training.pretrain.run_pretrain`` and ``training.finetune.run_finetune`` call it); it leaves ``row`` and
  ``base`` as they are.
"""

from __future__ import annotations

import argparse
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cxr_triage.ml.precision import cpu_flags
from training.engine import Runtime, cpu_model_name

BaseT = TypeVar("BaseT")
"""What a stretch started from, as its artefact's module reads it (a loaded file, or a provenance record)."""


def machine_description() -> str:
    """The processor and what it computes bf16 with, e.g. ``AMD EPYC (2 cores, AVX512-BF16)``."""
    flags = cpu_flags()
    isa = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 hardware"
    return f"{cpu_model_name()} ({os.cpu_count()} cores, {isa})"


def new_row(
    number: int, rt: Runtime, settings: dict[str, Any], from_artefact: bool, origin: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A stretch's row as it begins: number, start time, machine, device, precision, then the run's ``settings``,
    whether it began from the artefact (then with fresh optimiser moments), ``origin`` (more about what it began
    from) and its wall seconds so far (the key order is the order the artefact files show)."""
    return {
        "stretch": number,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_description(),
        "device": rt.device_name,
        "precision": rt.precision,
        **settings,
        "from_artefact": from_artefact,
        "fresh_optimizer_moments": from_artefact,
        **(origin or {}),
        "wall_seconds": 0.0,
    }


@dataclass
class Stretch(ABC, Generic[BaseT]):
    """This run as one stretch of an artefact's history (module docstring)."""

    args: argparse.Namespace
    base: BaseT | None
    row: dict[str, Any]
    started: float

    @abstractmethod
    def prior_history(self) -> list[dict[str, Any]]:
        """The epochs of the stretches before this one (none without a base)."""

    @abstractmethod
    def prior_stretches(self) -> list[dict[str, Any]]:
        """The rows of the stretches before this one (none without a base)."""

    @property
    @abstractmethod
    def floor(self) -> float:
        """The validation figure this stretch must beat to be exported (infinity without a base)."""

    @abstractmethod
    def base_state(self) -> Any:
        """What the resumable state keeps of ``base``, for ``_restore_base``."""

    @abstractmethod
    def _restore_base(self, saved: Any) -> None:
        """Set ``base`` back to what ``base_state`` returned when the resumable state was written."""

    @property
    def number(self) -> int:
        """This stretch's number: how many stretches came before it."""
        return len(self.prior_stretches())

    def elapsed_row(self) -> dict[str, Any]:
        """The row with its wall seconds up to now."""
        return {**self.row, "wall_seconds": self.row["wall_seconds"] + time.monotonic() - self.started}

    def state(self) -> dict[str, Any]:
        """The stretch as the resumable state keeps it: its row, with what it started from (``restore`` needs it:
        the artefact may have been rewritten by this very stretch since)."""
        return {**self.elapsed_row(), "base": self.base_state()}

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Continue the stretch a resumable state was written by (``--resume``): ``saved`` is its ``state()``."""
        if not saved:
            return
        self.row = {k: v for k, v in saved.items() if k != "base"}
        self._restore_base(saved.get("base"))

    def accumulate(
        self, rows: list[dict[str, Any]], epochs: int, figure: str, best: float
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The artefact's history (earlier epochs, then this stretch's ``rows``) and stretch rows (earlier ones,
        then this one with its ``epochs`` and its best validation ``figure``) when this stretch is exported."""
        stretch = {**self.elapsed_row(), "epochs": epochs, figure: best}
        return self.prior_history() + rows, self.prior_stretches() + [stretch]
