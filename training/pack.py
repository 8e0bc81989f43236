"""Packs: a whole labelled, split data set in one compact file that a GPU host can decode by itself.

A pack is one ``torch.save`` file (read back with ``weights_only=True``) holding every image as a 224x224 grey
baseline JPEG, concatenated into one uint8 tensor with offsets, plus labels, split, component (group/patient) ids,
source ids with their names (the manifest's ``source`` column) and a ``meta`` dict of plain values.
``torchvision.io.decode_jpeg`` decodes it in batches, on the GPU (``device="cuda"``, nvJPEG) or on the CPU.

Building a pack:

1. read the manifest and fix the split on ALL images first (``training.data.split_records``), so sampling can
   never move an image across splits and the test split is the same whatever the size limit;
2. take every image through the inference pipeline's scaling and resize steps (224x224 uint8);
3. pick the highest JPEG quality (from ``max_quality`` down to ``min_quality``) at which every image is estimated
   to fit in ``max_mib`` (estimated on a seeded sample of 256 images, then checked exactly);
4. only if even ``min_quality`` does not fit, drop images: whole components (groups/patients), largest classes
   first (water-filling towards a balanced class count), each split thinned in proportion, seeded.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cxr_triage import CLASS_NAMES
from cxr_triage.files import write_atomic
from cxr_triage.ml.imaging import IMAGE_SIZE
from training.data import (
    ImageSet,
    Manifest,
    balance_table,
    components,
    quiet_torchvision_io,
    read_gray,
    resize_to_uint8,
    split_counts,
    split_records,
)
from training.progress import progress_bar

logger = logging.getLogger(__name__)

FORMAT = "cxr-triage-pack/1"
DEFAULT_MAX_MIB = 58.0
"""Default pack size: a GPU host is reached with at most about 64 MiB beside the repository."""
MIB = 1 << 20
_OVERHEAD_BYTES = 16 * 1024  # margin for the size difference of the numbers in meta


class PackError(ValueError):
    """Not a pack, or a pack that does not fit the request."""


def encode_gray_jpeg(image: torch.Tensor, quality: int) -> bytes:
    """(224, 224) uint8 -> baseline grey JPEG bytes; Pillow's optimised Huffman tables when Pillow is present."""
    try:
        from PIL import Image
    except ImportError:  # torchvision's encoder: ~4 % larger files, same decoder
        from torchvision.io import encode_jpeg

        with quiet_torchvision_io():
            return bytes(encode_jpeg(image[None].cpu(), quality=quality).numpy())
    buf = io.BytesIO()
    Image.fromarray(image.cpu().numpy(), mode="L").save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _water_fill(class_sizes: dict[int, int], target_total: int) -> dict[int, int]:
    """Per-class caps with sum(min(size, cap)) ~ target_total: shrink the largest classes first."""
    if sum(class_sizes.values()) <= target_total:
        return dict(class_sizes)
    lo, hi = 0, max(class_sizes.values())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in class_sizes.values()) <= target_total:
            lo = mid
        else:
            hi = mid - 1
    return {c: min(n, lo) for c, n in class_sizes.items()}


def sample_to_fit(
    sizes: Sequence[int],
    labels: Sequence[int],
    split: Sequence[int],
    comp: Sequence[int],
    budget_bytes: int,
    seed: int = 0,
) -> list[int]:
    """Indices to keep so that sum(sizes) <= budget_bytes: balanced by class, whole components, split-stratified."""
    n = len(sizes)
    if sum(sizes) <= budget_bytes:
        return list(range(n))
    mean = sum(sizes) / n
    members: dict[int, list[int]] = {}
    for i, c in enumerate(comp):
        members.setdefault(c, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    comp_ids = sorted(members)
    order = [comp_ids[k] for k in torch.randperm(len(comp_ids), generator=gen).tolist()]
    target = int(budget_bytes / mean)
    while True:
        class_sizes: dict[int, int] = {}
        for lab in labels:
            class_sizes[lab] = class_sizes.get(lab, 0) + 1
        caps = _water_fill(class_sizes, target)
        # per (split, class) quota, proportional to the stratum's share of its class
        strata: dict[tuple[int, int], int] = {}
        for s, lab in zip(split, labels, strict=True):
            strata[(s, lab)] = strata.get((s, lab), 0) + 1
        quota = {k: round(v * caps[k[1]] / class_sizes[k[1]]) for k, v in strata.items()}
        taken: dict[tuple[int, int], int] = {k: 0 for k in strata}
        keep: list[int] = []
        for c in order:
            idx = members[c]
            key = (split[idx[0]], labels[idx[0]])
            if taken[key] < quota[key]:
                keep.extend(idx)
                for i in idx:
                    k2 = (split[i], labels[i])
                    taken[k2] = taken.get(k2, 0) + 1
        if sum(sizes[i] for i in keep) <= budget_bytes or target <= 1:
            return sorted(keep)
        target = int(target * 0.98)


def build_pack(
    manifest: Manifest,
    out: str | os.PathLike[str] | None,
    max_mib: float = DEFAULT_MAX_MIB,
    seed: int = 0,
    fractions: Sequence[float] = (0.73, 0.135, 0.135),
    max_quality: int = 95,
    min_quality: int = 70,
    progress: bool = False,
) -> dict:
    """Build a pack from a manifest; write it to ``out`` (atomically) when given; return the pack dict."""
    if not 1 <= min_quality <= max_quality <= 100:
        raise ValueError("JPEG qualities must satisfy 1 <= min_quality <= max_quality <= 100")
    records = manifest.records
    split = split_records(records, seed=seed, fractions=fractions)
    comp = components(records)
    labels = manifest.labels
    source_codes, source_names = manifest.source_codes()
    logger.info("split (seed %d) before any sampling:\n%s", seed, balance_table(labels, split, manifest.class_names))
    images = [
        resize_to_uint8(read_gray(r.path))
        for r in progress_bar(records, desc="decode", disable=not progress, mininterval=2.0)
    ]
    layout = _PackLayout(manifest, split, comp, source_codes, source_names, seed, fractions, max_mib)
    budget = layout.jpeg_budget(max_quality)
    probe = _SizeProbe(images, seed)
    quality = probe.estimate_quality(len(images), budget, max_quality, min_quality)
    logger.info("JPEG quality %d (estimated from %d images)", quality, len(probe.indices))
    quality, encoded = _encode_to_fit(images, probe, quality, budget, max_quality, min_quality, progress)
    logger.info("JPEG quality %d: %.2f MiB of images", quality, sum(map(len, encoded)) / MIB)
    keep = sample_to_fit([len(b) for b in encoded], labels, split, comp, budget, seed=seed)
    if len(keep) < len(records):
        logger.warning("pack sampled: %d of %d images kept to fit %.1f MiB", len(keep), len(records), max_mib)
    pack = layout.assemble(encoded, keep, quality)
    if out is not None:
        save_pack(pack, out)
    return pack


@dataclass(frozen=True)
class _PackLayout:
    """What a pack holds besides its JPEG bytes: the manifest, its split, components and sources, the request."""

    manifest: Manifest
    split: list[int]
    comp: list[int]
    source_codes: list[int]
    source_names: Sequence[str]
    seed: int
    fractions: Sequence[float]
    max_mib: float

    def assemble(self, encoded: Sequence[bytes], keep: Sequence[int], quality: int) -> dict:
        """The pack dict of the images ``keep`` (indices into the manifest), ``encoded`` at ``quality``."""
        manifest, labels, split = self.manifest, self.manifest.labels, self.split
        records = manifest.records
        blobs = [encoded[i] for i in keep]
        offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in blobs], dtype=torch.int64), 0)
        kept_labels = [labels[i] for i in keep]
        kept_split = [split[i] for i in keep]
        pack = {
            "format": FORMAT,
            "jpeg": _bytes_tensor(b"".join(blobs)),
            "offsets": offsets,
            "labels": torch.tensor(kept_labels, dtype=torch.int64),
            "split": torch.tensor(kept_split, dtype=torch.int64),
            "components": torch.tensor([self.comp[i] for i in keep], dtype=torch.int64),
            "sources": torch.tensor([self.source_codes[i] for i in keep], dtype=torch.int64),
            "source_names": list(self.source_names),
            "class_names": list(manifest.class_names),
            "meta": {
                "source": manifest.source,
                "paths": [str(records[i].path) for i in keep],
                "image_size": IMAGE_SIZE,
                "jpeg_quality": quality,
                "seed": self.seed,
                "fractions": list(self.fractions),
                "max_mib": self.max_mib,
                "images_in_manifest": len(records),
                "images_kept": len(keep),
                "counts_before_sampling": split_counts(labels, split, manifest.class_names),
                "counts": split_counts(kept_labels, kept_split, manifest.class_names),
            },
        }
        return pack

    def jpeg_budget(self, quality: int) -> int:
        """Bytes left for the JPEGs within ``max_mib``."""
        # everything but the JPEG bytes (paths, labels, split, offsets, zip framing), measured, plus a margin
        n = len(self.manifest.records)
        buf = io.BytesIO()
        torch.save(self.assemble([b""] * n, range(n), quality), buf)
        return int(self.max_mib * MIB) - len(buf.getvalue()) - _OVERHEAD_BYTES


class _SizeProbe:
    """JPEG sizes of a seeded sample of (at most 256) images, per quality, each quality encoded once."""

    def __init__(self, images: Sequence[torch.Tensor], seed: int) -> None:
        self.images = images
        gen = torch.Generator().manual_seed(seed)
        self.indices: list[int] = torch.randperm(len(images), generator=gen)[:256].tolist()
        self._totals: dict[int, int] = {}

    def total(self, quality: int) -> int:
        """Bytes of the sample's JPEGs at ``quality``."""
        if quality not in self._totals:
            self._totals[quality] = sum(len(encode_gray_jpeg(self.images[i], quality)) for i in self.indices)
        return self._totals[quality]

    def estimate_quality(self, n_images: int, budget: int, max_quality: int, min_quality: int) -> int:
        """The highest quality at which ``n_images`` are estimated to fit in ``budget`` (else ``min_quality``)."""
        for q in range(max_quality, min_quality - 1, -1):
            if self.total(q) / len(self.indices) * n_images <= budget * 0.985:
                return q
        return min_quality


def _encode_to_fit(
    images: Sequence[torch.Tensor],
    probe: _SizeProbe,
    quality: int,
    budget: int,
    max_quality: int,
    min_quality: int,
    progress: bool,
) -> tuple[int, list[bytes]]:
    """Encode every image from the estimated ``quality``, then correct it on the exact total: the quality and JPEGs."""

    def encode_all(q: int) -> list[bytes]:
        return [encode_gray_jpeg(img, q) for img in progress_bar(images, desc=f"encode q{q}", disable=not progress)]

    encoded = encode_all(quality)
    while sum(map(len, encoded)) > budget and quality > min_quality:
        quality -= 1
        encoded = encode_all(quality)
    # the estimate is conservative: step up while the exact size says the next quality should still fit
    while quality < max_quality:
        total = sum(map(len, encoded))
        if total * probe.total(quality + 1) / probe.total(quality) > budget:
            break
        better = encode_all(quality + 1)
        if sum(map(len, better)) > budget:
            break
        quality, encoded = quality + 1, better
    return quality, encoded


def save_pack(pack: dict, out: str | os.PathLike[str]) -> int:
    out = write_atomic(out, lambda fh: torch.save(pack, fh))
    return out.stat().st_size


def load_pack(path: str | os.PathLike[str]) -> dict:
    try:
        pack = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        raise PackError(f"{path}: not a loadable pack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(pack, dict) or pack.get("format") != FORMAT:
        raise PackError(f"{path}: not a {FORMAT} file")
    if tuple(pack["class_names"]) != CLASS_NAMES:
        raise PackError(f"{path}: classes {pack['class_names']} differ from {CLASS_NAMES}")
    return pack


def decode_pack(pack: dict, device: torch.device | str = "cpu", batch_size: int = 512) -> ImageSet:
    """Decode every JPEG of a pack into a (N, 224, 224) uint8 ImageSet on ``device`` (batched nvJPEG on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    data, offsets = pack["jpeg"], pack["offsets"].tolist()
    n = len(offsets) - 1
    images = torch.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, device=device)
    on_gpu = True
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        blobs = [data[offsets[i] : offsets[i + 1]] for i in range(start, stop)]
        decoded: list[torch.Tensor] | None = None
        if device.type == "cuda" and on_gpu:
            try:
                with quiet_torchvision_io():
                    decoded = decode_jpeg(blobs, mode=ImageReadMode.GRAY, device=device)
            except RuntimeError as exc:  # an nvJPEG limitation must not cost the run: decode on the CPU instead
                logger.warning("GPU JPEG decoding failed (%s); decoding on the CPU", exc)
                on_gpu = False
        if decoded is None:
            with quiet_torchvision_io():
                decoded = [decode_jpeg(b, mode=ImageReadMode.GRAY) for b in blobs]
        for j, img in enumerate(decoded):
            if img.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
                raise PackError(f"image {start + j} of the pack is {tuple(img.shape)}, not {IMAGE_SIZE}x{IMAGE_SIZE}")
            images[start + j] = img[0].to(device, non_blocking=True)  # channel 0 (grey, even if replicated)
    meta = dict(pack["meta"])
    meta.pop("paths", None)
    sources = pack.get("sources")  # packs written before sources were recorded have none
    return ImageSet(
        images=images,
        labels=pack["labels"].to(device),
        split=pack["split"].to(device),
        class_names=tuple(pack["class_names"]),
        meta=meta,
        sources=sources.to(device) if sources is not None else None,
        source_names=tuple(pack.get("source_names", ("",))),
    )


def describe_pack(pack: dict, path: str | os.PathLike[str] | None = None) -> str:
    meta = pack["meta"]
    size = f"{Path(path).stat().st_size / MIB:.2f} MiB" if path else "in memory"
    table = balance_table(pack["labels"].tolist(), pack["split"].tolist(), pack["class_names"])
    return (
        f"pack {path or ''} ({size}): {meta['images_kept']:,} of {meta['images_in_manifest']:,} images, "
        f"224x224 grey JPEG quality {meta['jpeg_quality']}, split seed {meta['seed']}\n{table}"
    )
