"""Where the model looked: Grad-CAM of the predicted class on the encoder's last convolution (docs/HEATMAP.md).

Grad-CAM (Selvaraju et al., 2017) weights the last convolution's feature maps (its ReLU output, 14x14 before the
encoder's last max-pool) by the spatial mean of the class score's gradient with respect to them, sums the weighted
maps and keeps the positive part. The map is then upsampled bilinearly from 14x14 straight to the radiograph's own
rows and columns, which undoes the squash to 224x224 of the pixel pipeline (``cxr_triage.ml.imaging``) in the
same step, and scaled to [0, 1] per image (all zeros when no position raises the class score).

The map is computed in float32 whatever precision the predictor runs (bf16 autocast is switched off inside), on
the device given at construction. The part of the encoder below the last convolution's output runs without
gradients; only the last max-pool and the head are differentiated, so the backward pass is small.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_triage.files import write_atomic
from cxr_triage.ml.imaging import IMAGE_SIZE
from cxr_triage.ml.model import CAEClassifier

HEATMAP_METHODS: tuple[str, ...] = ("gradcam",)
"""Methods ``[heatmap] method`` may name."""


@dataclass(frozen=True)
class CoarseMaps:
    """Maps at the last convolution's resolution, before upsampling: (N, h, w) float32 on the CPU, unscaled, and
    the class each one explains with the logits it came from."""

    maps: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor


class GradCAMHeatmap:
    """Builds Grad-CAM heatmaps of a ``CAEClassifier`` for batches of (3, 224, 224) model inputs."""

    def __init__(self, model: CAEClassifier, device: str | torch.device = "cpu", method: str = "gradcam") -> None:
        if method not in HEATMAP_METHODS:
            raise ValueError(f"unknown heatmap method {method!r}; expected one of {', '.join(HEATMAP_METHODS)}")
        if not isinstance(model, CAEClassifier):
            raise TypeError(f"expected a CAEClassifier, got {type(model).__name__}")
        layers = list(model.encoder)
        convs = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d)]
        if not convs or convs[-1] + 1 >= len(layers) or not isinstance(layers[convs[-1] + 1], nn.ReLU):
            raise ValueError("the encoder has no convolution followed by a ReLU to explain")
        self.method = method
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA was asked for but is not available")
        # A copy in float32 on the map's device, channels-last as the predictor runs it (faster on the CPU): the
        # predictor's model (perhaps bf16 autocast, perhaps on another device) is left as it is.
        self.model = copy.deepcopy(model).float().to(self.device).eval().to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        cut = convs[-1] + 2  # through the last convolution's ReLU
        encoder_layers = list(self.model.encoder)
        self._below = nn.Sequential(*encoder_layers[:cut])
        self._above = nn.Sequential(*encoder_layers[cut:])

    @property
    def num_classes(self) -> int:
        return self.model.spec.num_classes

    def coarse(self, images: torch.Tensor, classes: Sequence[int] | None = None) -> CoarseMaps:
        """Grad-CAM of ``classes`` (default: each image's predicted class) at the last convolution's resolution."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"expected (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) images, got {tuple(images.shape)}")
        if classes is not None and len(classes) != images.shape[0]:
            raise ValueError(f"{len(classes)} classes for {images.shape[0]} images")
        x = images.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=False):
            with torch.no_grad():
                features = self._below(self.model.encoder.normalise(x))
            features.requires_grad_(True)
            with torch.enable_grad():
                sequence = self._above(features).flatten(2).transpose(1, 2)
                logits = self.model.head(sequence)
                chosen = logits.argmax(1) if classes is None else torch.as_tensor(classes, device=logits.device)
                if chosen.min() < 0 or chosen.max() >= logits.shape[1]:
                    raise ValueError(f"class index out of range 0-{logits.shape[1] - 1}")
                score = logits.gather(1, chosen.view(-1, 1)).sum()
                (gradients,) = torch.autograd.grad(score, features)
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        maps = torch.relu((weights * features.detach()).sum(dim=1))
        return CoarseMaps(maps=maps.cpu(), classes=chosen.detach().cpu(), logits=logits.detach().cpu())

    def build(
        self, images: torch.Tensor, sizes: Sequence[tuple[int, int]], classes: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """One (rows, columns) float32 map in [0, 1] per image, at the geometry ``sizes`` gives (the radiograph's
        own Rows and Columns, before the squash to 224x224)."""
        if len(sizes) != images.shape[0]:
            raise ValueError(f"{len(sizes)} sizes for {images.shape[0]} images")
        for rows, columns in sizes:
            if rows < 1 or columns < 1:
                raise ValueError(f"invalid image size {rows}x{columns}")
        coarse = self.coarse(images, classes).maps
        return [upsample(m, (int(r), int(c))) for m, (r, c) in zip(coarse, sizes, strict=True)]


def upsample(coarse: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (h, w) map bilinearly resized to ``size`` (rows, columns) and scaled to [0, 1] by its maximum."""
    full = F.interpolate(coarse[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    full = full.clamp_min(0)
    peak = full.max()
    return full / peak if peak > 0 else torch.zeros_like(full)


def save_coarse(path: str | os.PathLike[str], coarse: torch.Tensor) -> Path:
    """Store one (h, w) coarse map, scaled to [0, 1] by its maximum, as a float16 ``.npy`` file (written atomically).

    This is what the worker keeps per classified instance (``instances.heatmap_path``): the map over the squashed
    224x224 input, so stretching it over the radiograph's own rows and columns (``upsample``, or a browser scaling
    it onto the displayed image) undoes the squash."""
    if coarse.ndim != 2:
        raise ValueError(f"expected an (h, w) map, got shape {tuple(coarse.shape)}")
    scaled = coarse.detach().float().clamp_min(0).cpu()
    peak = scaled.max()
    scaled = scaled / peak if peak > 0 else torch.zeros_like(scaled)
    buffer = io.BytesIO()
    np.save(buffer, scaled.numpy().astype(np.float16), allow_pickle=False)
    return write_atomic(path, buffer.getvalue())


def load_coarse(path: str | os.PathLike[str]) -> np.ndarray:
    """A map ``save_coarse`` stored: (h, w) float32 in [0, 1]."""
    values = np.load(Path(path), allow_pickle=False)
    if values.ndim != 2:
        raise ValueError(f"{path}: expected an (h, w) map, got shape {values.shape}")
    return values.astype(np.float32)
