"""The last steps of the pixel pipeline (scaling to [0, 1] and the resize to 224x224), shared by inference and training.

Everything that reaches the model passes through ``to_model_input`` (one image) or ``to_model_batch`` (a batch,
on any device), so a model sees identical inputs whichever door the pixels came in by: a DICOM file decoded by
``cxr_triage.ml.preprocess`` or an 8-bit JPEG/PNG read by the training data loader. This module imports neither
pydicom nor PIL, so the training package can use it on a GPU host that has only torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 224
PREPROCESSING_VERSION = "cxr-pp/1"
"""Bumped whenever the pipeline's output for the same input changes; stored in every checkpoint."""


def preprocessing_version(input_norm: str = "none") -> str:
    """What a checkpoint of a model with ``input_norm`` records: ``cxr-pp/1``, or ``cxr-pp/1+equalise``.

    The normalisation is part of the pixel pipeline, so code that does not know it (which would feed the model
    un-normalised images) refuses such a checkpoint instead of running it.
    """
    return PREPROCESSING_VERSION if input_norm == "none" else f"{PREPROCESSING_VERSION}+{input_norm}"


def to_model_batch(images01: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Resize a (N, 1, H, W) batch of [0, 1] grey images to (N, 3, size, size), antialiased.

    The paper squashes every image to a square, so the aspect ratio is not kept.
    """
    if images01.ndim != 4 or images01.shape[1] != 1:
        raise ValueError(f"expected a (N, 1, H, W) batch, got {tuple(images01.shape)}")
    x = images01.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


INPUT_NORMS: tuple[str, ...] = ("none", "equalise")
"""Per-image intensity normalisations a model can declare (``ModelSpec.input_norm``); ``none`` is the paper's."""


def equalise(x: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalisation of a (N, C, H, W) batch of grey images (all channels equal), in float32.

    Every pixel becomes its mid-rank among the image's pixels, scaled into (0, 1): ``(below + at_or_below) / 2N``.
    Ranks do not change under any increasing transform of the intensities, so a window of another width, a
    percentile window, a gamma curve or another bit depth of the same radiograph gives (nearly) the same output;
    only pixels that a narrower window clips together, and the quantisation of the input, still differ. Tied
    pixels share one value (no order by position is made up). Equalising twice changes nothing.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got {tuple(x.shape)}")
    n, c, h, w = x.shape
    values = x[:, 0].reshape(n, h * w).float().contiguous()
    ordered = values.sort(dim=1).values
    below = torch.searchsorted(ordered, values, right=False)
    at_or_below = torch.searchsorted(ordered, values, right=True)
    ranks = (below + at_or_below).to(torch.float32).mul_(0.5 / (h * w))
    out = ranks.view(n, 1, h, w).expand(n, c, h, w)
    if c > 1 and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def normalise(x: torch.Tensor, input_norm: str) -> torch.Tensor:
    """The per-image intensity normalisation ``input_norm`` names (``INPUT_NORMS``) applied to a model batch."""
    if input_norm == "none":
        return x
    if input_norm == "equalise":
        return equalise(x)
    raise ValueError(f"unknown input normalisation {input_norm!r}; expected one of {', '.join(INPUT_NORMS)}")


def to_model_input(image01: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Resize one (H, W) grey image already scaled to [0, 1] to a (3, size, size) float32 tensor."""
    t = torch.as_tensor(image01, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {tuple(t.shape)}")
    return to_model_batch(t[None, None], size)[0]


def uint8_to_unit(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Step 6 for 8-bit images: the known range of 8-bit data is 0..255."""
    t = torch.as_tensor(image)
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {t.dtype}")
    return t.float().div_(255.0)
