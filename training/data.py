"""Manifests, the group-aware split, and the device-resident image set used by every training command.

A manifest lists labelled images: a CSV with ``path,label`` and optional ``group``, ``patient_id`` and ``source``
columns (extra columns are ignored, so the shared ``labels.csv`` works as is), or a folder with one sub-folder per
class. The source (the public data set an image came from) is kept so that results can be broken down by it and
training can keep the model from learning the source instead of the disease.

The split (73 / 13.5 / 13.5 by default) is made once, seeded, over connected components of images that share a
``group`` or a ``patient_id``, so near-duplicates and one patient's images never straddle two sides. It is
stratified by class. Packs store it, so every later command (and every sampling step) sees the same split and test
images are never used for a choice.

Pixels follow the inference pipeline (``cxr_triage.ml.preprocess``): 8-bit images enter at the scaling step
(``cxr_triage.ml.imaging.uint8_to_unit``) and are resized by ``cxr_triage.ml.imaging.to_model_batch``. Images are kept
as 224x224 uint8 (the output of the resize step, re-quantised to 8 bits; exact for the 224x224 sources) so that the
whole training set fits on the GPU (11k images = 0.6 GB) and batches are cut and augmented there.

Augmentation (training batches only; mild, on the batch with tensor ops, on whatever device holds the images):
a random affine per image (rotation +-5 degrees, isotropic scale 0.95-1.05, translation +-4 % of the side, border
filled by edge replication), then brightness +-10 % and contrast +-10 % around the image mean, clamped to [0, 1].
No horizontal flip: the heart's side is anatomy, not noise.

Source cues (``source_cues``, on by default): the public data sets differ in ways that have nothing to do with
disease (borders and burned-in markers, contrast curves, resolution, noise), and each holds mostly one class, so a
model can recognise the data set instead of the finding. On top of the mild augmentation: zoom in up to 20 %
with aspect +-5 % (cuts borders and edge markers), gamma 0.7-1.4, contrast 0.8-1.25, a blur or sharpen of random
strength (a 5-tap binomial kernel), Gaussian noise with sigma up to 0.02, and one patch of 5-15 % of the side per
image filled with the image mean.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cxr_triage import CLASS_NAMES
from cxr_triage.ml.imaging import IMAGE_SIZE, normalise, to_model_batch, uint8_to_unit
from training.progress import progress_bar

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.73, 0.135, 0.135)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ManifestError(ValueError):
    """The manifest cannot be read or names unknown classes / missing files."""


@dataclass(frozen=True)
class Record:
    """One labelled image of a manifest."""

    path: Path
    label: int
    group: str = ""
    patient_id: str = ""
    source: str = ""


@dataclass
class Manifest:
    records: list[Record]
    class_names: tuple[str, ...] = CLASS_NAMES
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def source_codes(self) -> tuple[list[int], tuple[str, ...]]:
        """A source index per image and the sorted source names (one blank name when no source is given)."""
        names = tuple(sorted({r.source for r in self.records}))
        return [names.index(r.source) for r in self.records], names


def read_manifest(
    manifest: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, check_files: bool = True
) -> Manifest:
    """Read a CSV manifest (``path,label[,group,patient_id]``) or a folder of class folders."""
    manifest = Path(manifest)
    if manifest.is_dir():
        return _read_class_folders(manifest)
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such manifest file or folder")
    base = Path(root) if root is not None else manifest.parent
    records: list[Record] = []
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ManifestError(f"{manifest}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip().lower()
            if label not in CLASS_NAMES:
                raise ManifestError(f"{manifest}:{line}: unknown label {row['label']!r}; expected {CLASS_NAMES}")
            path = base / row["path"].strip()
            if check_files and not path.is_file():
                raise ManifestError(f"{manifest}:{line}: image {path} does not exist")
            records.append(
                Record(
                    path=path,
                    label=CLASS_NAMES.index(label),
                    group=(row.get("group") or "").strip(),
                    patient_id=(row.get("patient_id") or "").strip(),
                    source=(row.get("source") or "").strip(),
                )
            )
    if not records:
        raise ManifestError(f"{manifest}: no images listed")
    return Manifest(records=records, source=str(manifest))


def _read_class_folders(folder: Path) -> Manifest:
    records: list[Record] = []
    for index, name in enumerate(CLASS_NAMES):
        sub = folder / name
        if not sub.is_dir():
            continue
        for path in sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            records.append(Record(path=path, label=index))
    if not records:
        raise ManifestError(f"{folder}: no images under class folders {', '.join(CLASS_NAMES)}")
    return Manifest(records=records, source=str(folder))


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def components(records: Sequence[Record]) -> list[int]:
    """A component id per image: images sharing a non-blank ``group`` or ``patient_id`` are one component."""
    uf = _UnionFind(len(records))
    first: dict[tuple[str, str], int] = {}
    for i, r in enumerate(records):
        for key in (("g", r.group), ("p", r.patient_id)):
            if not key[1]:
                continue
            if key in first:
                uf.union(first[key], i)
            else:
                first[key] = i
    roots = [uf.find(i) for i in range(len(records))]
    renumber: dict[int, int] = {}
    return [renumber.setdefault(root, len(renumber)) for root in roots]


def split_records(
    records: Sequence[Record], seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> list[int]:
    """A split index (0 train, 1 val, 2 test) per image; components never straddle two splits.

    Components are shuffled with ``seed`` and dealt, class by class (a component counts for its most common
    label), to the split furthest below its target share of that class.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    comp = components(records)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(comp):
        members.setdefault(c, []).append(i)
    by_class: dict[int, list[int]] = {}
    for c, idx in members.items():
        label = Counter(records[i].label for i in idx).most_common(1)[0][0]
        by_class.setdefault(label, []).append(c)
    gen = torch.Generator().manual_seed(seed)
    split = [0] * len(records)
    for label in sorted(by_class):
        comps = by_class[label]
        order = torch.randperm(len(comps), generator=gen).tolist()
        total = sum(len(members[comps[k]]) for k in order)
        filled = [0, 0, 0]
        for k in order:
            c = comps[k]
            size = len(members[c])
            # the split with the largest deficit against its target after taking this component
            deficit = [fractions[s] * total - filled[s] for s in range(3)]
            s = max(range(3), key=lambda s: (deficit[s], -s))
            filled[s] += size
            for i in members[c]:
                split[i] = s
    return split


def balance_table(labels: Sequence[int], split: Sequence[int], class_names: Sequence[str] = CLASS_NAMES) -> str:
    """A plain-text class-balance table: one row per split, one column per class, plus totals."""
    counts = Counter(zip(split, labels, strict=True))
    header = f"{'split':<8}" + "".join(f"{n:>11}" for n in class_names) + f"{'total':>9}"
    lines = [header, "-" * len(header)]
    for s, name in enumerate(SPLITS):
        row = [counts.get((s, c), 0) for c in range(len(class_names))]
        lines.append(f"{name:<8}" + "".join(f"{v:>11,}" for v in row) + f"{sum(row):>9,}")
    tot = [sum(counts.get((s, c), 0) for s in range(3)) for c in range(len(class_names))]
    lines.append(f"{'all':<8}" + "".join(f"{v:>11,}" for v in tot) + f"{sum(tot):>9,}")
    return "\n".join(lines)


def split_counts(labels: Sequence[int], split: Sequence[int], class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """The balance table as plain JSON values: {split: {class: count}}."""
    counts = Counter(zip(split, labels, strict=True))
    return {name: {cls: counts.get((s, c), 0) for c, cls in enumerate(class_names)} for s, name in enumerate(SPLITS)}


@dataclass
class ImageSet:
    """Decoded 224x224 uint8 images with labels and split, all on one device."""

    images: torch.Tensor  # (N, 224, 224) uint8
    labels: torch.Tensor  # (N,) int64
    split: torch.Tensor  # (N,) int64: 0 train, 1 val, 2 test
    class_names: tuple[str, ...] = CLASS_NAMES
    meta: dict = field(default_factory=dict)
    sources: torch.Tensor | None = None  # (N,) int64 index into source_names; None: one unnamed source
    source_names: tuple[str, ...] = ("",)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}) uint8 images, got {self.images.shape}")
        if self.labels.shape != (n,) or self.split.shape != (n,):
            raise ValueError("labels and split must have one entry per image")
        if self.sources is None:
            self.sources = torch.zeros(n, dtype=torch.int64, device=self.images.device)
        if self.sources.shape != (n,):
            raise ValueError("sources must have one entry per image")
        if n and int(self.sources.max()) >= len(self.source_names):
            raise ValueError(f"source index {int(self.sources.max())} but only {len(self.source_names)} source names")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def indices(self, split: str) -> torch.Tensor:
        return torch.nonzero(self.split == SPLITS.index(split)).flatten()

    def counts(self) -> dict:
        return split_counts(self.labels.tolist(), self.split.tolist(), self.class_names)

    def table(self) -> str:
        return balance_table(self.labels.tolist(), self.split.tolist(), self.class_names)

    def to(self, device: torch.device | str) -> ImageSet:
        assert self.sources is not None
        return ImageSet(
            self.images.to(device),
            self.labels.to(device),
            self.split.to(device),
            self.class_names,
            self.meta,
            self.sources.to(device),
            self.source_names,
        )

    def source_table(self) -> dict[str, dict[str, dict[str, int]]]:
        """{source: {split: {class: count}}} as plain values."""
        assert self.sources is not None
        out: dict[str, dict[str, dict[str, int]]] = {}
        for s, name in enumerate(self.source_names):
            keep = (self.sources == s).cpu()
            out[name or "(unnamed)"] = split_counts(
                self.labels.cpu()[keep].tolist(), self.split.cpu()[keep].tolist(), self.class_names
            )
        return out


def independence_weights(
    labels: torch.Tensor, sources: torch.Tensor, clip: tuple[float, float] = (0.25, 4.0)
) -> torch.Tensor:
    """Per-image sampling weights under which the label says as little as possible about the source.

    An image of source ``s`` and class ``y`` gets ``P(s) P(y) / P(s, y)`` (importance weights that turn the
    observed joint distribution into the product of its margins, where the cell exists), clipped to ``clip`` so
    that a handful of images (15 normals of one source) cannot dominate an epoch, then scaled to mean 1. A source
    that holds one class only keeps that link: weights cannot create images that do not exist.
    """
    labels, sources = labels.cpu(), sources.cpu()
    n = float(len(labels))
    if n == 0:
        return torch.zeros(0)
    n_classes, n_sources = int(labels.max()) + 1, int(sources.max()) + 1
    joint = torch.zeros(n_sources, n_classes, dtype=torch.float64)
    joint.index_put_((sources, labels), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    p_joint = joint / n
    p_s, p_y = p_joint.sum(1, keepdim=True), p_joint.sum(0, keepdim=True)
    cell = (p_s * p_y / p_joint.clamp_min(1e-12)).clamp(*clip)
    w = cell[sources, labels]
    return (w / w.mean()).float()


def resize_to_uint8(gray: torch.Tensor) -> torch.Tensor:
    """(1, H, W) uint8 -> (224, 224) uint8 through the inference pipeline's scaling and resize steps."""
    if gray.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return gray[0].contiguous()
    x = to_model_batch(uint8_to_unit(gray)[None])[:, :1]  # (1, 1, 224, 224) in [0, 1]
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)[0, 0]


@contextlib.contextmanager
def quiet_torchvision_io() -> Iterator[None]:
    """torchvision >= 0.29 warns on every image decode/encode call that it is deprecated in favour of TorchCodec.

    The GPU host runs torchvision 0.26, where nothing is deprecated; the warning is only noise here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
        yield


def read_gray(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode an 8-bit JPEG or PNG file to (1, H, W) uint8 grey with torchvision.io."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        with quiet_torchvision_io():
            img = decode_image(read_file(str(path)), mode=ImageReadMode.GRAY)
    except RuntimeError as exc:
        raise ManifestError(f"{path}: cannot decode image ({exc})") from exc
    if img.dtype != torch.uint8:
        raise ManifestError(f"{path}: expected 8-bit pixels, got {img.dtype}")
    return img


def load_manifest_images(manifest: Manifest, split: Sequence[int], progress: bool = False) -> ImageSet:
    """Decode every image of a manifest (CPU) into an ImageSet; for small data without a pack."""
    images = torch.empty((len(manifest), IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    for i, r in enumerate(progress_bar(manifest.records, desc="decode", disable=not progress, mininterval=2.0)):
        images[i] = resize_to_uint8(read_gray(r.path))
    codes, names = manifest.source_codes()
    return ImageSet(
        images=images,
        labels=torch.tensor(manifest.labels, dtype=torch.int64),
        split=torch.tensor(list(split), dtype=torch.int64),
        class_names=manifest.class_names,
        meta={"source": manifest.source},
        sources=torch.tensor(codes, dtype=torch.int64),
        source_names=names,
    )


def epoch_batches(
    indices: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    weights: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """This rank's batches of ``indices`` for one epoch.

    With ``weights`` (one per index; training only) the epoch is ``len(indices)`` draws with replacement in
    proportion to them instead of a permutation.

    The permutation depends only on (seed, epoch), so every rank agrees on it; each rank takes every
    ``world_size``-th index of a permutation truncated to a multiple of ``world_size``, so all ranks run the same
    number of steps (DistributedDataParallel needs that). Shuffled (training) epochs drop the last partial batch.
    """
    idx = indices.cpu()
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        if weights is not None and len(idx):
            idx = idx[torch.multinomial(weights.cpu().double(), len(idx), replacement=True, generator=gen)]
        else:
            idx = idx[torch.randperm(len(idx), generator=gen)]
    if world_size > 1:
        usable = (len(idx) // world_size) * world_size if shuffle else len(idx)
        idx = idx[:usable][rank::world_size]
    if shuffle and len(idx) > batch_size:
        # training drops the last partial batch (a different random remainder each epoch): no tiny, noisy steps
        # and one batch shape, so torch.compile does not recompile for the tail
        idx = idx[: (len(idx) // batch_size) * batch_size]
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def model_inputs(
    images_u8: torch.Tensor,
    augment: bool = False,
    generator: torch.Generator | None = None,
    source_cues: bool = False,
    size: int = IMAGE_SIZE,
    input_norm: str = "none",
) -> torch.Tensor:
    """(B, 224, 224) uint8 -> (B, 3, size, size) float in [0, 1], augmented when asked, on the images' device.

    ``input_norm`` applies the model's input normalisation here as well (the encoder applies it again, which
    changes nothing): the autoencoder's target is the normalised image.
    """
    x = uint8_to_unit(images_u8)[:, None]  # (B, 1, H, W)
    if augment:
        x = augment_batch(x, generator, source_cues=source_cues)
    return normalise(to_model_batch(x, size), input_norm)


def _uniform(b: int, low: float, high: float, dev: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(b, generator=gen, device=dev) * (high - low) + low


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, source_cues: bool = False) -> torch.Tensor:
    """The augmentation documented in the module docstring, on a (B, 1, H, W) [0, 1] batch.

    ``source_cues`` adds the transforms that blur what tells the public data sets apart (see the docstring).
    """
    b, dev = x.shape[0], x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return _uniform(b, low, high, dev, generator)

    angle = uniform(-5.0, 5.0) * (math.pi / 180.0)
    if source_cues:  # zoom in up to 20 % (cuts borders and edge markers), aspect +-5 %
        scale = uniform(0.95, 1.2)
        sx, sy = scale * uniform(0.95, 1.05), scale * uniform(0.95, 1.05)
    else:
        sx = sy = uniform(0.95, 1.05)
    tx, ty = uniform(-0.08, 0.08), uniform(-0.08, 0.08)  # +-4 % of the side in [-1, 1] coordinates
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos / sx, -sin / sy, tx], 1), torch.stack([sin / sx, cos / sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if source_cues:
        x = _source_cue_transforms(x, uniform, generator)
        brightness, contrast = uniform(-0.1, 0.1), uniform(0.8, 1.25)
    else:
        brightness, contrast = uniform(-0.1, 0.1), uniform(0.9, 1.1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast.view(b, 1, 1, 1) + mean + brightness.view(b, 1, 1, 1)).clamp_(0.0, 1.0)


_BLUR = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _source_cue_transforms(
    x: torch.Tensor, uniform: Callable[[float, float], torch.Tensor], generator: torch.Generator | None
) -> torch.Tensor:
    """Gamma, blur-or-sharpen, noise and one erased patch per image, on a (B, 1, H, W) [0, 1] batch."""
    b, _, h, w = x.shape
    gamma = torch.exp(uniform(math.log(0.7), math.log(1.4))).view(b, 1, 1, 1)
    x = x.clamp(1e-4, 1.0).pow(gamma)
    k = _BLUR.to(x.device, x.dtype)
    blurred = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5))
    blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1))
    amount = uniform(-1.0, 1.0).view(b, 1, 1, 1)  # < 0 blurs, > 0 sharpens: sources differ in resolution
    x = x + amount * (x - blurred)
    noise = uniform(0.0, 0.02).view(b, 1, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    cy, cx, size = uniform(0.0, 1.0), uniform(0.0, 1.0), uniform(0.05, 0.15)
    gy = torch.linspace(0.0, 1.0, h, device=x.device).view(1, h, 1)
    gx = torch.linspace(0.0, 1.0, w, device=x.device).view(1, 1, w)
    patch = ((gy - cy.view(b, 1, 1)).abs() < size.view(b, 1, 1) / 2) & (
        (gx - cx.view(b, 1, 1)).abs() < size.view(b, 1, 1) / 2
    )
    fill = x.mean(dim=(1, 2, 3), keepdim=True)
    return torch.where(patch[:, None], fill, x).clamp_(0.0, 1.0)


def iterate_inputs(
    data: ImageSet,
    batches: Sequence[torch.Tensor],
    augment: bool,
    generator: torch.Generator | None = None,
    source_cues: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) per batch, cut from the device-resident images."""
    for idx in batches:
        idx = idx.to(data.device, non_blocking=True)
        yield model_inputs(data.images[idx], augment, generator, source_cues), data.labels[idx]
