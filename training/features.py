"""The frozen encoder's features, computed once (``FeatureBank``), and on disk while they are computed
(``FeatureStore``), so that a stopped run keeps them.

Phase 1 of fine-tuning (and retraining's head epochs, and ``sources``) train the head on ``FeatureBank``: the
encoder's features of the training and validation images, computed once (at the paper's width on a 2-core CPU,
about half an hour). Fine-tuning gives it a ``FeatureStore``: the batches done so far are written into the run's
state folder at most every ``--checkpoint-seconds`` and when the computation stops, and a resumed run
(``--resume``) loads them and goes on from the next unfinished batch; a finished bank is loaded whole.

Layout, in ``FOLDER`` under ``--out``:

- ``index.pt`` (format ``cxr-triage-feature-bank/1``): ``identity`` (what the features were computed from: the
  encoder weights' sha256, the image indices with their sha256, the images' sha256, the batch size, the model
  spec, the dtype and the device type), the image indices themselves, ``batches`` done of ``total_batches``, the
  ``shards`` holding them in order and the ``seconds`` spent computing them (over all processes);
- one ``part-AAAAAA-BBBBBB.pt`` per checkpoint, holding batches ``[A, B)``: each checkpoint writes only the new
  batches, so the whole computation writes the bank once however often it checkpoints.

Every file is written atomically (``cxr_triage.files.write_atomic``): a shard first, then the index that names
it, so a crash leaves the index naming complete shards only (a shard it does not name is removed on loading).
A bank whose identity differs from the run's (another encoder, other images, another batch size, spec, precision
or device) is removed and computed again, never mixed in. Features are kept as computed (bf16 under autocast,
float32 otherwise), so a resumed bank is bit-identical to an uninterrupted one. Fine-tuning deletes the folder
(``remove_bank``) once phase 1 has ended.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxr_triage.files import fsync_dir, write_atomic
from training.data import ImageSet, model_inputs
from training.engine import Deadline, Runtime
from training.progress import progress_bar

logger = logging.getLogger(__name__)

FORMAT = "cxr-triage-feature-bank/1"
FOLDER = "phase1_features"
INDEX = "index.pt"
UNREADABLE = (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, IndexError)
"""What loading a torn, foreign or vanished bank file raises: the bank is then computed again."""


def _update(digest: Any, t: torch.Tensor) -> None:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy())


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The sha256 of named tensors (names, dtypes, shapes and values, in the order given)."""
    digest = hashlib.sha256()
    for name, t in named:
        digest.update(name.encode())
        _update(digest, t)
    return digest.hexdigest()


def images_sha256(images: torch.Tensor, indices: torch.Tensor, chunk: int = 256) -> str:
    """The sha256 of ``images[indices]`` in that order, copied to the host ``chunk`` images at a time."""
    digest = hashlib.sha256()
    for start in range(0, len(indices), chunk):
        _update(digest, images[indices[start : start + chunk].to(images.device)])
    return digest.hexdigest()


def bank_identity(
    encoder: nn.Module, spec: dict[str, Any], images: torch.Tensor, indices: torch.Tensor, batch_size: int, dtype: str
) -> dict[str, Any]:
    """What a bank is computed from; a stored bank is reused only when this is equal (plain values only)."""
    idx = indices.cpu()
    return {
        "format": FORMAT,
        "encoder_sha256": tensors_sha256(sorted(encoder.state_dict().items())),
        "indices_sha256": tensors_sha256([("indices", idx)]),
        "images": len(idx),
        "images_sha256": images_sha256(images, idx),
        "batch_size": batch_size,
        "spec": dict(spec),
        "dtype": dtype,
        "device": images.device.type,
    }


@dataclass
class FeatureStore:
    """A bank's files in ``folder`` (module docstring). ``load`` first, then ``save`` as batches are done."""

    folder: Path
    identity: dict[str, Any]
    indices: torch.Tensor
    every: float = 30.0  # seconds between saves
    resume: bool = True  # False: a bank already there is removed, not loaded
    writer: bool = True  # False (DDP ranks other than 0): only reads, never removes or writes
    batches: int = 0
    seconds: float = 0.0
    shards: list[str] = field(default_factory=list)
    last: float = field(default_factory=time.monotonic)

    @property
    def total_batches(self) -> int:
        return math.ceil(self.identity["images"] / self.identity["batch_size"])

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every

    def load(self) -> torch.Tensor | None:
        """The features of the first ``batches`` batches saved earlier for this identity (None: start afresh)."""
        index = self._read_index()
        if index is None:
            return None
        try:
            features = self._read_shards(index)
        except UNREADABLE as exc:
            logger.warning("feature bank %s: a shard is unreadable (%s); computing it again", self.folder, exc)
            features = None
        if features is None:
            self.remove()
            return None
        self.batches, self.seconds, self.shards = index["batches"], float(index["seconds"]), list(index["shards"])
        if self.writer:
            self._drop_strays()
        return features if index["batches"] else None

    def _read_shards(self, index: dict[str, Any]) -> torch.Tensor | None:
        """The shards ``index`` names, joined; None when they do not add up to its ``batches``."""
        parts = [torch.load(self.folder / n, map_location="cpu", weights_only=True) for n in index["shards"]]
        rows = min(index["batches"] * self.identity["batch_size"], self.identity["images"])
        spans = [(p["start"], p["end"]) for p in parts]
        features = torch.cat([p["features"] for p in parts]) if parts else torch.zeros(0)
        if (
            spans != _spans(index["shards"])
            or index["batches"] != (spans[-1][1] if spans else 0)
            or len(features) != rows
        ):
            logger.warning("feature bank %s: its shards do not add up; computing the features again", self.folder)
            return None
        return features

    def _read_index(self) -> dict[str, Any] | None:
        path = self.folder / INDEX
        if not self.resume or not path.is_file():
            if self.folder.exists():
                self.remove()
            return None
        try:
            index = torch.load(path, map_location="cpu", weights_only=True)
        except UNREADABLE as exc:
            logger.warning("feature bank %s unreadable (%s); computing the features again", path, exc)
            self.remove()
            return None
        old = index.get("identity") if isinstance(index, dict) else None
        if old != self.identity:
            old = old if isinstance(old, dict) else {}
            differs = sorted(k for k in self.identity if old.get(k) != self.identity[k]) or ["format"]
            logger.warning("feature bank %s was computed from another %s; computing it again", path, ", ".join(differs))
            self.remove()
            return None
        return index

    def save(self, new: list[torch.Tensor], batches: int, seconds: float) -> None:
        """Add ``new``, the features of batches ``self.batches`` to ``batches``; ``seconds``: the bank's compute time
        so far, over every process that computed part of it."""
        if batches > self.batches:
            name = f"part-{self.batches:06d}-{batches:06d}.pt"
            shard = {"start": self.batches, "end": batches, "features": torch.cat(new).to("cpu")}
            write_atomic(self.folder / name, lambda fh: torch.save(shard, fh), sync_dir=False)
            self.shards.append(name)
        self.batches, self.seconds = batches, seconds
        index = {
            "format": FORMAT, "identity": self.identity, "indices": self.indices.cpu(), "batches": self.batches,
            "total_batches": self.total_batches, "shards": self.shards, "seconds": self.seconds,
        }  # fmt: skip
        write_atomic(self.folder / INDEX, lambda fh: torch.save(index, fh))
        self.last = time.monotonic()

    def remove(self) -> None:
        """Delete the bank's folder (phase 1 has ended, or the bank cannot be used); the writer alone does."""
        if self.writer:
            remove_bank(self.folder)
        self.batches, self.seconds, self.shards = 0, 0.0, []

    def _drop_strays(self) -> None:
        """Shards a crash wrote without the index naming them (and temporary files) are not part of the bank."""
        for path in self.folder.iterdir():
            if path.name != INDEX and path.name not in self.shards:
                path.unlink()


def remove_bank(folder: Path) -> bool:
    """Delete a bank's folder if there is one; whether there was."""
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    fsync_dir(folder.parent)
    return True


def _spans(names: list[str]) -> list[tuple[int, int]]:
    """The batch spans the shard names say, which must follow on from one another from batch 0."""
    spans = [(int(n.split("-")[1]), int(n.split("-")[2].split(".")[0])) for n in names]
    return spans if all(a == (spans[i - 1][1] if i else 0) for i, (a, _) in enumerate(spans)) else []


def _agreed_start(batches: int, rt: Runtime) -> int:
    """The batch every rank starts a feature bank at: its loaded batches where all ranks loaded as many, else 0."""
    if not rt.distributed:
        return batches
    total = rt.all_sum(float(batches))[0]
    return 0 if rt.any(total != batches * rt.world_size) else batches


class FeatureBank:
    """The frozen encoder's output for a set of images, computed once: phase 1 trains the head on it.

    With the encoder frozen, every epoch of phase 1 would recompute the same (49, C) sequence per image; on a CPU
    that is most of the cost. Features are of unaugmented images (augmentation would change them every epoch).

    With a ``store`` (``FeatureStore``) the batches done so far are written to disk at most every ``store.every``
    seconds and at the end, and those a stopped run wrote are loaded instead of computed again. With a
    ``deadline``, the computation stops between batches once it expires (or SIGTERM arrives): ``complete`` is then
    false and the bank must not be trained on.
    """

    def __init__(
        self,
        encoder: nn.Module,
        data: ImageSet,
        indices: torch.Tensor,
        rt: Runtime,
        batch_size: int,
        store: FeatureStore | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        t0 = time.perf_counter()
        encoder.eval()
        idx = indices.cpu()
        self.position = torch.full((len(data),), -1, dtype=torch.int64)
        self.position[idx] = torch.arange(len(idx))
        self.labels, self.data, self.images = data.labels, data, len(idx)
        self.total_batches = (len(idx) + batch_size - 1) // batch_size
        loaded = store.load() if store is not None else None
        self.loaded_batches = _agreed_start(store.batches if store is not None and loaded is not None else 0, rt)
        if store is not None and loaded is not None and not self.loaded_batches:
            store.remove()  # the ranks loaded different parts: all of them start afresh
        chunks = [loaded.to(rt.device)] if loaded is not None and self.loaded_batches else []
        earlier = store.seconds if store is not None else 0.0
        done = self._encode(encoder, data, idx, rt, batch_size, chunks, store, deadline, earlier - t0)
        self.computed_batches = done - self.loaded_batches
        self.complete = done == self.total_batches
        # kept in the autocast dtype: the head then sees what CAEClassifier.forward gives it (and on the CPU, a
        # float32 input to the LSTM under bf16 autocast makes oneDNN fail: "could not create a primitive descriptor")
        c = chunks[0].shape[-1] if chunks else 0
        self.features = torch.cat(chunks) if chunks else torch.zeros((0, 49, c), device=rt.device)
        self.seconds = earlier + time.perf_counter() - t0  # over every process that computed part of it

    def _encode(
        self,
        encoder: nn.Module,
        data: ImageSet,
        idx: torch.Tensor,
        rt: Runtime,
        batch_size: int,
        chunks: list[torch.Tensor],
        store: FeatureStore | None,
        deadline: Deadline | None,
        clock: float,
    ) -> int:
        """Append the features of the batches after ``loaded_batches`` to ``chunks``; the batches done in all.

        ``clock + time.perf_counter()`` is the bank's compute seconds so far (what ``store.save`` records)."""
        first = done = self.loaded_batches
        saved = len(chunks)
        writer = store if rt.is_main else None
        pbar = progress_bar(
            total=self.total_batches, desc="features", disable=not rt.progress, leave=False, mininterval=1.0
        )
        pbar.update(first)
        with torch.no_grad():
            for b in range(first, self.total_batches):
                if b > first and deadline is not None and rt.any(deadline.expired()):
                    break
                if writer is not None and b > first and writer.due():
                    writer.save(chunks[saved:], b, clock + time.perf_counter())
                    saved = len(chunks)
                part = idx[b * batch_size : (b + 1) * batch_size].to(data.device)
                with rt.autocast():
                    f = encoder(rt.inputs(model_inputs(data.images[part])))
                chunks.append(f.flatten(2).transpose(1, 2).to(torch.bfloat16 if rt.amp else torch.float32).contiguous())
                done = b + 1
                pbar.update(1)
        pbar.close()
        if writer is not None and done > writer.batches:
            writer.save(chunks[saved:], done, clock + time.perf_counter())
        return done

    def inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.position[idx.cpu()]
        if bool((pos < 0).any()):
            raise IndexError("an index without features in this bank")
        pos = pos.to(self.features.device)
        return self.features[pos], self.labels[idx.to(self.labels.device)]
