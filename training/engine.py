"""Training and evaluation loops in the manner of torchvision's classification references.

``train_one_epoch`` (the autoencoder or the classifier, by its criterion) and ``evaluate`` are plain functions over
a device-resident ``ImageSet``; ``training.loop.fit`` runs the epochs around them. ``Runtime`` holds the device,
precision and distributed settings:

- precision (``cxr_triage.ml.precision``, ``--amp``): bf16 autocast on CUDA and on a CPU with bf16 in hardware
  (AMX-BF16 / AVX512-BF16), float32 elsewhere; channels_last on both devices; optional ``torch.compile``;
- images are held on the training device, so a step is a gather, an augmentation and a forward/backward with no
  host round trip;
- ``torchrun`` (``WORLD_SIZE`` > 1): DistributedDataParallel, NCCL on CUDA and gloo on the CPU; every rank holds
  all images and takes its share of each epoch's permutation; decisions (early stopping, time budget) are
  all-reduced so that ranks never disagree.

``Deadline`` carries the wall-clock budget and SIGTERM: loops stop cleanly between steps when it expires.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cxr_triage.files import write_atomic
from cxr_triage.ml.imaging import IMAGE_SIZE
from cxr_triage.ml.model import ConvAutoencoder
from cxr_triage.ml.precision import autocast, resolve_precision
from training.data import ImageSet, epoch_batches, iterate_inputs, model_inputs
from training.progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    device: torch.device
    amp: bool = False  # bf16 autocast
    channels_last: bool = False
    compile: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    progress: bool = True

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({cpu_model_name()}, {torch.get_num_threads()} threads)"

    @property
    def precision(self) -> str:
        return "bfloat16" if self.amp else "float32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device, self.precision)

    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        for m in module.modules():
            if isinstance(m, nn.LSTM):
                m.flatten_parameters()  # one contiguous weight chunk for cuDNN after the moves
        return module

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP (when distributed) and torch.compile (when asked) around an already prepared module."""
        wrapped: nn.Module = module
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if self.compile:
            wrapped = torch.compile(wrapped)  # type: ignore[assignment]
        return wrapped

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def all_sum(self, *values: float) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return self.all_sum(1.0 if flag else 0.0)[0] > 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def cpu_model_name() -> str:
    """The processor's model name from /proc/cpuinfo ("unknown CPU" elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown CPU"


def setup_runtime(
    device: str = "auto",
    amp: bool | str | None = None,
    channels_last: bool = True,
    compile: bool = False,
    progress: bool = True,
) -> Runtime:
    """The runtime for this process; joins the process group when launched by torchrun (WORLD_SIZE > 1).

    ``amp``: True forces bf16 autocast, False float32, None or "auto" chooses by the hardware
    (``cxr_triage.ml.precision.resolve_precision``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world_size > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    requested = "auto" if amp is None or amp == "auto" else ("bfloat16" if amp else "float32")
    return Runtime(
        device=dev,
        amp=resolve_precision(requested, dev) == "bfloat16",
        channels_last=channels_last,
        compile=compile,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        progress=progress and rank == 0,
    )


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seconds_since_process_start() -> float:
    """How long this process has existed (Linux /proc; 0 elsewhere): a budget counts Python and torch start-up too."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Deadline:
    """A wall-clock limit (monotonic clock) plus a stop flag set by SIGTERM/SIGINT handlers."""

    stop_requested = False

    def __init__(self, seconds: float | None = None, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.end = self.start + seconds if seconds is not None else math.inf

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return Deadline.stop_requested or time.monotonic() >= self.end

    def sub(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now, never later than this one."""
        d = Deadline(start=time.monotonic())
        d.end = min(self.end, d.start + max(0.0, seconds))
        return d

    @staticmethod
    def install_signal_handlers() -> None:
        def _stop(signum: int, frame: object) -> None:
            logger.warning("signal %d: stopping after the current step; finished work is kept", signum)
            Deadline.stop_requested = True

        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, _stop)


@dataclass
class EpochProgress:
    """How far an interrupted epoch got: the batches done and the running sums of this process.

    Resuming skips those batches of the epoch's permutation (``epoch_batches`` draws the same one again for the
    same seed and epoch) and starts the sums from here; augmentation draws differ after a resume. Under DDP the
    sums are rank 0's, so a resumed epoch's training loss is that rank's share (its weights are exact)."""

    batches: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochProgress:
        return cls(**{k: data[k] for k in vars(cls()) if k in data})


@dataclass
class Within:
    """Checkpoints inside an epoch (``training.loop.fit`` makes one per epoch): where to start, and ``save`` to
    call with the progress at most every ``every`` seconds (``last`` is when the phase last saved)."""

    start: EpochProgress | None = None
    save: Callable[[EpochProgress], None] | None = None
    every: float = math.inf
    last: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        return self.save is not None and time.monotonic() - self.last >= self.every


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    accuracy: float | None = None
    stopped_early: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def _progress(total: int, rt: Runtime, desc: str) -> Any:
    return progress_bar(total=total, desc=desc, disable=not rt.progress, leave=False, mininterval=1.0)


Inputs = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Turns a batch of image indices into (model input, labels) on the training device."""


def image_inputs(
    data: ImageSet,
    rt: Runtime,
    augment: bool,
    source_cues: bool = False,
    size: int = IMAGE_SIZE,
    input_norm: str = "none",
) -> Inputs:
    """Model inputs cut from the device-resident images, augmented when asked, at ``size``, normalised."""

    def cut(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(data.device, non_blocking=True)
        x = model_inputs(data.images[idx], augment, source_cues=source_cues, size=size, input_norm=input_norm)
        return rt.inputs(x), data.labels[idx]

    return cut


def _run_epoch(
    step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    inputs: Inputs,
    batches: list[torch.Tensor],
    rt: Runtime,
    deadline: Deadline | None,
    desc: str,
    within: Within | None = None,
    check_every: int = 20,
) -> EpochStats:
    within = within or Within()
    done = within.start or EpochProgress()
    _sync(rt)
    t0 = time.perf_counter() - done.seconds
    loss_sum = torch.full((), done.loss_sum, dtype=torch.float64, device=rt.device)
    correct = torch.full((), done.correct, dtype=torch.int64, device=rt.device)
    seen, stopped, has_logits = done.seen, False, done.correct > 0
    pbar = _progress(len(batches), rt, desc)
    pbar.update(done.batches)
    for i in range(done.batches, len(batches)):
        if i % check_every == 0 and i > done.batches:
            # without a budget a SIGTERM still stops the epoch here, not only at its end
            if rt.any(deadline.expired() if deadline is not None else Deadline.stop_requested):
                stopped = True
                break
            if within.due() and rt.is_main:
                assert within.save is not None
                within.save(EpochProgress(i, loss_sum.item(), int(correct.item()), seen, time.perf_counter() - t0))
                within.last = time.monotonic()
        x, y = inputs(batches[i])
        loss, logits = step(x, y)
        loss_sum += loss.detach().double() * y.shape[0]
        if logits is not None:
            has_logits = True
            correct += (logits.detach().argmax(1) == y).sum()
        seen += y.shape[0]
        pbar.update(1)
    pbar.close()
    _sync(rt)
    seconds = time.perf_counter() - t0
    total_loss, total_correct, total_seen = rt.all_sum(loss_sum.item(), float(correct.item()), float(seen))
    return EpochStats(
        loss=total_loss / max(total_seen, 1.0),
        images=int(total_seen),
        seconds=seconds,
        accuracy=(total_correct / max(total_seen, 1.0)) if has_logits else None,
        stopped_early=stopped,
    )


Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
"""(model output, input, labels) -> (loss, logits for the accuracy, or None)."""


def reconstruction_loss(output: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, None]:
    """The autoencoder's loss: MSE between the reconstruction and the (augmented) input; labels unused."""
    return F.mse_loss(output.float(), x), None


def classification_loss(output: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's loss: categorical cross-entropy of the logits."""
    return F.cross_entropy(output.float(), y), output


@torch.no_grad()
def evaluate_cae(module: ConvAutoencoder, data: ImageSet, indices: torch.Tensor, rt: Runtime, batch_size: int) -> float:
    """Mean reconstruction MSE over ``indices`` at 224x224 (sharded across ranks, all-reduced), against the input as
    the encoder sees it (``ConvAutoencoder.target``)."""
    module.eval()
    batches = epoch_batches(indices, batch_size, shuffle=False, rank=rt.rank, world_size=rt.world_size)
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    n = 0
    for x, _ in iterate_inputs(data, batches, augment=False):
        x = rt.inputs(x)
        target = module.target(x).float()
        with rt.autocast():
            recon = module(x)
        total += F.mse_loss(recon.float(), target, reduction="sum").double() / x[0].numel()
        n += x.shape[0]
    s, count = rt.all_sum(total.item(), float(n))
    return s / max(count, 1.0)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Inputs,
    indices: torch.Tensor,
    rt: Runtime,
    *,
    criterion: Criterion = classification_loss,
    batch_size: int,
    seed: int,
    epoch: int,
    weights: torch.Tensor | None = None,
    deadline: Deadline | None = None,
    within: Within | None = None,
) -> EpochStats:
    """One training epoch: the autoencoder (``reconstruction_loss``) or the classifier (``classification_loss``).

    ``inputs`` turns index batches into model inputs: augmented images (``image_inputs``), or cached encoder
    features (``training.features.FeatureBank.inputs``) for the head alone. ``weights`` (one per index) draws the
    epoch with replacement in proportion to them. ``within`` resumes an interrupted epoch and checkpoints inside it.
    """
    model.train()
    batches = epoch_batches(
        indices,
        batch_size,
        shuffle=True,
        seed=seed,
        epoch=epoch,
        rank=rt.rank,
        world_size=rt.world_size,
        weights=weights,
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with rt.autocast():
            output = model(x)
        loss, logits = criterion(output, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logits

    desc = "train cae" if criterion is reconstruction_loss else "train cls"
    return _run_epoch(step, inputs, batches, rt, deadline, desc, within)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    labels: torch.Tensor = field(repr=False)
    probabilities: torch.Tensor = field(repr=False)
    seconds: float = 0.0


@torch.no_grad()
def evaluate(
    module: nn.Module,
    data: ImageSet,
    indices: torch.Tensor,
    rt: Runtime,
    batch_size: int = 256,
    gather: bool = True,
    inputs: Inputs | None = None,
) -> EvalResult:
    """Loss, accuracy and probabilities over ``indices``.

    Distributed: each rank evaluates its shard; loss and accuracy are all-reduced. Probabilities are those of this
    rank's shard unless ``gather`` is false and the caller evaluates everything on one rank (evaluate command).
    ``inputs`` (default: unaugmented images) may feed cached features to a head instead.
    """
    module.eval()
    _sync(rt)
    t0 = time.perf_counter()
    shard = gather and rt.distributed
    batches = epoch_batches(
        indices, batch_size, shuffle=False, rank=rt.rank if shard else 0, world_size=rt.world_size if shard else 1
    )
    probs, labels = [], []
    cut = inputs or image_inputs(data, rt, augment=False)
    for idx in batches:
        x, y = cut(idx)
        with rt.autocast():
            logits = module(x)
        probs.append(torch.softmax(logits.float(), 1))
        labels.append(y)
    p = torch.cat(probs) if probs else torch.zeros((0, len(data.class_names)), device=data.device)
    y = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.int64, device=data.device)
    loss_sum = F.nll_loss(torch.log(p.clamp_min(1e-12)), y, reduction="sum").item() if len(y) else 0.0
    correct = (p.argmax(1) == y).sum().item() if len(y) else 0
    _sync(rt)
    seconds = time.perf_counter() - t0
    if shard:
        loss_sum, correct, n = rt.all_sum(loss_sum, float(correct), float(len(y)))
    else:
        n = float(len(y))
    return EvalResult(
        loss=loss_sum / max(n, 1.0),
        accuracy=correct / max(n, 1.0),
        labels=y.cpu(),
        probabilities=p.cpu(),
        seconds=seconds,
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    inner = getattr(module, "_orig_mod", module)
    return getattr(inner, "module", inner)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Atomic ``torch.save`` of a training state (tensors and plain values only)."""
    write_atomic(path, lambda fh: torch.save(state, fh))


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(module).state_dict().items()}


def check_replicas_agree(module: nn.Module, rt: Runtime, what: str) -> None:
    """Distributed runs: raise if the ranks' copies of ``module`` have drifted apart (they must be identical)."""
    if not rt.distributed:
        return
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in unwrap(module).parameters())
        t = torch.stack([total, -total]).to(rt._comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if float(t[0] + t[1]) > 1e-6 * max(1.0, abs(float(total))):
        raise RuntimeError(f"{what}: model replicas differ across ranks (checksum spread {float(t[0] + t[1])})")


def seed_everything(seed: int, rank: int = 0) -> None:
    torch.manual_seed(seed + rank)


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as plain JSON values (for checkpoints and provenance)."""
    out: dict[str, Any] = {}
    for k, v in sorted(vars(args).items()):
        if k.startswith("_"):
            continue
        out[k] = v if isinstance(v, str | int | float | bool | type(None)) else str(v)
    return out
