"""The pixel check for a lateral view: a frontal chest radiograph is left-right symmetric, a lateral one is not.

When the header cannot tell the projection (``ViewPosition`` absent and ``cxr_triage.ml.view`` finds nothing, or a
PNG/JPEG without any header), a lateral view would otherwise be classified as if it were frontal. A frontal
radiograph has two lung fields mirrored about a bright midline (mediastinum and spine); a lateral has one lung
field, the spine at one side and the sternum at the other. Four explainable cues measure that on the model's
224x224 input, after a per-image histogram equalisation (``imaging.equalise``), so that a wider window or a gamma
curve changes them little:

- ``midline``: in the middle 70 % of the rows, the mean brightness of the central columns minus the mean of the
  darkest column on each side (the mediastinum brighter than both lungs);
- ``edges_h`` and ``edges_v``: the correlation of the image's horizontal and of its vertical edge strength with
  their mirror images (ribs and lung borders repeat on both sides of a frontal image, the vertebral endplates of a
  lateral stand on one side only);
- ``mirror``: the correlation of a 28x28 version of the image with its mirror, each row's left-right brightness
  slope removed and the axis allowed to move by up to four cells (a patient off the centre of the detector).

Each cue becomes a robust z-score against the validation split's frontal images (median and IQR / 1.349) and the
**symmetry score** is their mean. An image is refused as ``looks_lateral`` when it is below ``THRESHOLD``, the
0.5 % quantile of the validation split's scores (so about 1 frontal in 200 is refused by it). No lateral image
was used to fit these numbers (the shared data hold none); which cues to average was settled after measuring them
on 12 real lateral views from a public collection, of which the check refuses 4. ``bench/lateral_eval.py`` refits
the constants (``--fit``) and measures the check on the splits and on a folder of lateral views
(``docs/RESULTS.md``, "Lateral views from the pixels").

Only ``cxr_triage.ml.preprocess`` calls it, and only when the header did not say which view it is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxr_triage.ml.imaging import IMAGE_SIZE, equalise

CUES = ("midline", "edges_h", "edges_v", "mirror")
REFUSAL_CODE = "looks_lateral"


class ViewVerdict(enum.Enum):
    """What the pixels say about the projection."""

    FRONTAL = "frontal"
    LATERAL = "lateral"


@dataclass(frozen=True)
class CueScale:
    """A cue's median and robust spread on the validation split's frontal radiographs."""

    median: float
    spread: float


FRONTAL_SCALES: dict[str, CueScale] = {
    "midline": CueScale(0.4191, 0.1184),
    "edges_h": CueScale(0.3479, 0.1927),
    "edges_v": CueScale(0.288, 0.2857),
    "mirror": CueScale(0.8499, 0.084),
}
"""Fitted by ``python bench/lateral_eval.py --pack packs/cxr-full.pack --fit`` on the validation split."""
THRESHOLD = -2.122
"""The 0.5 % quantile of the validation split's symmetry scores (same command)."""


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each image's (N, H, W) ``a`` with ``b``, over the last two dimensions."""
    a = a - a.mean((1, 2), keepdim=True)
    b = b - b.mean((1, 2), keepdim=True)
    return (a * b).sum((1, 2)) / (a.square().sum((1, 2)).sqrt() * b.square().sum((1, 2)).sqrt() + 1e-8)


def _without_row_slopes(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) with each row's least-squares left-right slope removed (an odd ramp that mirrors into its negative)."""
    ramp = torch.linspace(-1.0, 1.0, x.shape[-1])
    slope = (x * ramp).sum(-1, keepdim=True) / ramp.square().sum()
    return x - slope * ramp


def _midline(x: torch.Tensor) -> torch.Tensor:
    profile = x[:, 34:190, :].mean(1)  # column means of the middle 70 % of the rows
    centre = profile[:, 101:123].mean(1)
    left, right = profile[:, 34:79].min(1).values, profile[:, 145:190].min(1).values
    return centre - 0.5 * (left + right)


def _edge_mirrors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = F.avg_pool2d(x[:, None], 2)[:, 0]  # 112x112
    horizontal = (half[:, 2:, 1:-1] - half[:, :-2, 1:-1]).abs()  # a vertical step: horizontal edges (ribs)
    vertical = (half[:, 1:-1, 2:] - half[:, 1:-1, :-2]).abs()
    out = []
    for edges in (horizontal, vertical):
        coarse = F.avg_pool2d(edges[:, None], 4)[:, 0][:, 3:24]  # 27x27, the middle rows
        out.append(_correlation(coarse, coarse.flip(2)))
    return out[0], out[1]


def _mirror(x: torch.Tensor, max_shift: int = 4) -> torch.Tensor:
    small = _without_row_slopes(F.adaptive_avg_pool2d(x[:, None], 28)[:, 0][:, 4:24])
    width = small.shape[-1]
    mirrored = small.flip(2)
    best = torch.full((x.shape[0],), -1.0)
    for shift in range(-max_shift, max_shift + 1):
        a = small[:, :, max(0, shift) : width + min(0, shift)]
        b = mirrored[:, :, max(0, -shift) : width + min(0, -shift)]
        best = torch.maximum(best, _correlation(a, b))
    return best


@torch.inference_mode()
def cues(images: torch.Tensor) -> torch.Tensor:
    """(N, len(CUES)) raw cues of model inputs: (N, 3, 224, 224), (N, 224, 224) or one (3, 224, 224) image."""
    x = images.float()
    if x.ndim == 4:
        x = x[:, 0]
    elif x.ndim == 3 and x.shape[0] == 3 and x.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE):
        x = x[:1]
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected {IMAGE_SIZE}x{IMAGE_SIZE} model inputs, got {tuple(images.shape)}")
    x = equalise(x[:, None])[:, 0]
    edges_h, edges_v = _edge_mirrors(x)
    return torch.stack([_midline(x), edges_h, edges_v, _mirror(x)], 1)


def scores_from_cues(raw: torch.Tensor, scales: dict[str, CueScale] | None = None) -> torch.Tensor:
    """(N,) symmetry scores: the mean of the cues' robust z-scores (lower = less like a frontal view)."""
    scales = scales or FRONTAL_SCALES
    z = [(raw[:, i] - scales[name].median) / scales[name].spread for i, name in enumerate(CUES)]
    return torch.stack(z, 1).mean(1)


def symmetry_scores(images: torch.Tensor) -> torch.Tensor:
    """(N,) symmetry scores of model inputs (see ``cues``)."""
    return scores_from_cues(cues(images))


@dataclass(frozen=True)
class ViewCheck:
    """One image's symmetry score and verdict."""

    score: float
    threshold: float = THRESHOLD

    @property
    def verdict(self) -> ViewVerdict:
        return ViewVerdict.LATERAL if not self.score >= self.threshold else ViewVerdict.FRONTAL

    def reason(self) -> str:
        return (
            f"looks like a lateral view (left-right symmetry {self.score:.2f} below {self.threshold:.2f}), or not a "
            "frontal chest radiograph; the header does not say which view it is, and only PA and AP are classified"
        )


def check_view(image: torch.Tensor) -> ViewCheck:
    """The pixel check of one (3, 224, 224) model input."""
    return ViewCheck(round(float(symmetry_scores(image)[0]), 4))
