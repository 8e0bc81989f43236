"""The typicality gate: refuses an image that does not look like the chest radiographs the model was trained on.

Header checks refuse a CT or a lateral by their tags; a knee sent as "CR CHEST PA", a photograph of a screen, a
blank or inverted frame pass them. The gate scores every prepared image with the convolutional autoencoder (the
classifier's pretrained encoder and a decoder for it) by up to four measures, each compared with the training images:

- ``recon``: the autoencoder's reconstruction error (log mean squared error);
- ``texture``: the channel means and spreads of the encoder's first four stages (low-level statistics: noise,
  natural images and flat frames stand out);
- ``layout``: the encoder's last feature map averaged over a 3x3 grid (where the lungs, heart and diaphragm are:
  an inverted or rotated chest image stands out, which the reconstruction error alone does not catch);
- ``outlier``: the logit of a linear model on both feature blocks, fitted against training images rotated,
  flipped, inverted or cropped (the ways a real chest radiograph most often arrives wrong).

The two feature blocks are scored by their Mahalanobis distance to the training features (standardised features,
Ledoit-Wolf shrunk covariance, kept as its leading eigenvectors plus one residual variance). Each measure is turned
into a z-score against training images held out of the fit (median and robust spread of its logarithm), and an
image's **typicality score** is the largest of them: about 0-2 for a chest radiograph, higher the less it
looks like one. The refusal threshold is the ``1 - false_refusal_rate`` quantile of the validation split's
scores, which the gate file stores, so the false-refusal rate is a setting (``[gate] false_refusal_rate``).

**Per-block thresholds** (a gate file with ``validation_block_scores`` and ``block_quantiles``): each block is
compared with its own threshold, the ``block_quantiles`` quantile of the validation split's z-scores of that block
(a quantile of 1 keeps a block out of the decision; each block's tail share scales with ``false_refusal_rate`` /
0.01). The score is then the largest block z-score scaled so that its block's threshold lands on ``threshold``:
refused above ``threshold`` exactly when some block is above its own. One source's contrast or resolution moves
one block's tail (the texture block for the COVID-19 Radiography Database, the reconstruction error for a
squashed 640x640 source); one threshold on the largest z-score refused those sources several times as often as
the others (``docs/RESULTS.md``).

The gate is its own file (``models/cae_gate.pt`` with a ``.sha256`` sidecar), independent of the classifier's
version: a retrained classifier keeps the same gate. It is loaded with ``torch.load(weights_only=True)``. This
module imports no DICOM library, so ``training`` fits the gate with the same feature code the runtime scores with.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cxr_triage.files import file_sha256
from cxr_triage.ml.model import Decoder, Encoder

if TYPE_CHECKING:
    from cxr_triage.core.settings import GateSettings

FORMAT = "cxr-triage-gate/1"
BUNDLED_GATE = Path(__file__).resolve().parents[1] / "models" / "cae_gate.pt"
BLOCKS = ("recon", "texture", "layout", "outlier")
LAYOUT_GRID = 3
REFUSAL_CODE = "atypical"


class GateError(ValueError):
    """The file is not a typicality gate, or its checksum does not match."""


@dataclass(frozen=True)
class GaussianModel:
    """A Gaussian on standardised features, its covariance kept as ``rank`` eigenvectors plus a residual variance."""

    mean: torch.Tensor  # (d,) per-feature mean
    scale: torch.Tensor  # (d,) per-feature standard deviation
    eigenvectors: torch.Tensor  # (d, k)
    eigenvalues: torch.Tensor  # (k,)
    residual: float  # variance left outside the k directions (per direction)

    def __post_init__(self) -> None:
        d, k = self.eigenvectors.shape
        if self.mean.shape != (d,) or self.scale.shape != (d,) or self.eigenvalues.shape != (k,):
            raise GateError("inconsistent Gaussian model shapes")
        if self.residual <= 0 or bool((self.eigenvalues <= 0).any()):
            raise GateError("a Gaussian model's variances must be positive")

    @classmethod
    def fit(cls, features: torch.Tensor, rank: int = 256) -> GaussianModel:
        """Fit on (n, d) features: standardise, shrink the covariance (Ledoit-Wolf), keep ``rank`` directions."""
        x = features.double()
        mean = x.mean(0)
        scale = x.std(0).clamp_min(1e-6)
        z = (x - mean) / scale
        cov, shrinkage = ledoit_wolf(z)
        values, vectors = torch.linalg.eigh(cov)
        values, vectors = values.flip(0), vectors.flip(1)
        k = min(rank, z.shape[1])
        rest = values[k:]
        residual = float(rest.mean()) if rest.numel() else float(values[-1])
        return cls(
            mean.float(), scale.float(), vectors[:, :k].float().contiguous(), values[:k].float(), max(residual, 1e-6)
        )

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.scale

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row of ``features`` (n, d)."""
        z = self.standardise(features)
        proj = z @ self.eigenvectors
        inside = (proj.square() / self.eigenvalues).sum(1)
        outside = (z.square().sum(1) - proj.square().sum(1)).clamp_min(0.0) / self.residual
        return inside + outside

    def state(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "scale": self.scale,
            "eigenvectors": self.eigenvectors.half(),
            "eigenvalues": self.eigenvalues,
            "residual": self.residual,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GaussianModel:
        return cls(
            state["mean"].float(),
            state["scale"].float(),
            state["eigenvectors"].float(),
            state["eigenvalues"].float(),
            float(state["residual"]),
        )


def ledoit_wolf(z: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The Ledoit-Wolf shrunk covariance of centred-by-us rows ``z`` (n, d), and its shrinkage (0..1)."""
    z = z - z.mean(0)
    n, d = z.shape
    emp = z.T @ z / n
    mu = float(torch.trace(emp)) / d
    z2 = z.square()
    beta_sum = float((z2.T @ z2).sum()) / n
    delta_sum = float(emp.square().sum())
    beta = (beta_sum - delta_sum) / (d * n)
    delta = (delta_sum - 2 * mu * float(torch.trace(emp)) + d * mu * mu) / d
    shrinkage = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
    eye = torch.eye(d, dtype=z.dtype)
    return (1 - shrinkage) * emp + shrinkage * mu * eye, shrinkage


@dataclass(frozen=True)
class OutlierModel:
    """A linear model on the standardised texture and layout features: its logit is high for altered chest images.

    Fitted (``training.gate``) on training-split chest radiographs against the same images rotated, flipped upside
    down, intensity-inverted or cropped: the ways a real chest radiograph most often arrives wrong (a wrong
    orientation tag, a MONOCHROME1/2 mix-up, a detail view), which the Gaussians alone catch poorly.
    """

    weight: torch.Tensor  # (d_texture + d_layout,)
    bias: float

    def logit(self, texture: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        return torch.cat([texture, layout], 1) @ self.weight + self.bias

    def state(self) -> dict[str, Any]:
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> OutlierModel:
        return cls(state["weight"].float(), float(state["bias"]))


def raw_values(
    measures: dict[str, torch.Tensor], gaussians: dict[str, GaussianModel], outlier: OutlierModel | None
) -> dict[str, torch.Tensor]:
    """Each block's raw value (before its z-scaling) from ``Autoencoder.measures``: log error, log distances, logit."""
    texture, layout = measures["texture"].float().cpu(), measures["layout"].float().cpu()
    values = {
        "recon": measures["recon"].float().cpu(),
        "texture": gaussians["texture"].distance(texture).clamp_min(1e-6).log(),
        "layout": gaussians["layout"].distance(layout).clamp_min(1e-6).log(),
    }
    if outlier is not None:
        values["outlier"] = outlier.logit(
            gaussians["texture"].standardise(texture), gaussians["layout"].standardise(layout)
        )
    return values


class Autoencoder(nn.Module):
    """Encoder and decoder, with the features the gate scores."""

    def __init__(self, width: int, input_norm: str = "none") -> None:
        super().__init__()
        self.width = width
        self.encoder = Encoder(width, input_norm)
        self.decoder = Decoder(width)

    @torch.inference_mode()
    def measures(self, x: torch.Tensor, reconstruct: bool = True) -> dict[str, torch.Tensor]:
        """For a (N, 3, 224, 224) batch in [0, 1]: log reconstruction error (N,), texture (N, dt), layout (N, dl).

        ``reconstruct=False`` skips the decoder (no ``recon``): what fitting the feature Gaussians needs."""
        return self.measures_with_grad(x, reconstruct)

    def measures_with_grad(self, x: torch.Tensor, reconstruct: bool = True) -> dict[str, torch.Tensor]:
        x = self.encoder.normalise(x.float())
        h = x
        stages: list[torch.Tensor] = []
        for layer in self.encoder:
            h = layer(h)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(h)
        texture = torch.cat([torch.cat([s.mean((2, 3)), s.std((2, 3))], 1) for s in stages[:4]], 1)
        layout = nn.functional.adaptive_avg_pool2d(stages[-1], LAYOUT_GRID).flatten(1)
        if not reconstruct:
            return {"texture": texture, "layout": layout}
        recon = self.decoder(stages[-1])
        mse = (recon[:, :1] - x[:, :1].float()).square().mean((1, 2, 3))
        return {"recon": mse.clamp_min(1e-8).log(), "texture": texture, "layout": layout}


@dataclass(frozen=True)
class RobustScale:
    """Median and robust spread (IQR / 1.349) of a measure's logarithm on held-out training images."""

    median: float
    spread: float

    @classmethod
    def fit(cls, values: torch.Tensor) -> RobustScale:
        v = values.double()
        q1, q2, q3 = (float(torch.quantile(v, q)) for q in (0.25, 0.5, 0.75))
        return cls(q2, max((q3 - q1) / 1.349, 1e-6))

    def z(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.median) / self.spread


class TypicalityGate:
    """Scores prepared images; refuses those above ``threshold``. Build with ``load_gate`` or ``from_parts``."""

    def __init__(
        self,
        network: Autoencoder,
        gaussians: dict[str, GaussianModel],
        scales: dict[str, RobustScale],
        validation_scores: torch.Tensor,
        false_refusal_rate: float = 0.01,
        version: str = "gate",
        sha256: str = "",
        device: torch.device | str = "cpu",
        outlier: OutlierModel | None = None,
        validation_block_scores: torch.Tensor | None = None,
        block_quantiles: dict[str, float] | None = None,
    ) -> None:
        blocks = [b for b in BLOCKS if b != "outlier" or outlier is not None]
        if set(gaussians) != {"texture", "layout"} or set(scales) != set(blocks):
            raise GateError(f"a gate needs Gaussians for texture and layout and scales for {', '.join(blocks)}")
        if not 0.0 < false_refusal_rate < 0.5:
            raise GateError(f"false_refusal_rate must be between 0 and 0.5, not {false_refusal_rate}")
        if validation_scores.ndim != 1 or validation_scores.numel() < 20:
            raise GateError("a gate needs the validation split's scores (at least 20) to set its threshold")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.gaussians = gaussians
        self.outlier = outlier
        self.blocks = tuple(blocks)
        self.scales = scales
        self.validation_scores = validation_scores.float().sort().values
        self.false_refusal_rate = false_refusal_rate
        self.threshold = float(torch.quantile(self.validation_scores.double(), 1.0 - false_refusal_rate))
        self.version = version
        self.sha256 = sha256
        self.validation_block_scores = validation_block_scores
        self.block_quantiles = dict(block_quantiles or {})
        self.block_scale = self._block_scale()

    def _block_scale(self) -> torch.Tensor | None:
        """Per block, what its z-score is multiplied by (``threshold`` / its own threshold; 0 for a block left out)."""
        if self.validation_block_scores is None or not self.block_quantiles:
            return None
        scores = self.validation_block_scores.double()
        if scores.ndim != 2 or scores.shape[1] != len(self.blocks) or set(self.block_quantiles) != set(self.blocks):
            raise GateError(f"per-block thresholds need validation scores and a quantile for {', '.join(self.blocks)}")
        scale = []
        for index, block in enumerate(self.blocks):
            tail = (1.0 - self.block_quantiles[block]) * self.false_refusal_rate / 0.01
            if tail <= 0:
                scale.append(0.0)
                continue
            own = float(torch.quantile(scores[:, index], max(0.0, 1.0 - tail)))
            if own <= 0:
                raise GateError(f"the {block} block's threshold {own:.3f} is not positive")
            scale.append(self.threshold / own)
        return torch.tensor(scale)

    def block_thresholds(self) -> dict[str, float]:
        """Each block's own threshold on its z-score (infinite for a block left out); all ``threshold`` without."""
        if self.block_scale is None:
            return dict.fromkeys(self.blocks, self.threshold)
        scale = self.block_scale.tolist()
        return {b: self.threshold / k if k > 0 else math.inf for b, k in zip(self.blocks, scale, strict=True)}

    def block_scores(self, images: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
        """(N, len(self.blocks)) z-scores, in the order of ``self.blocks``."""
        batch = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        rows = []
        for start in range(0, batch.shape[0], batch_size):
            measures = self.network.measures(batch[start : start + batch_size].to(self.device))
            values = raw_values(measures, self.gaussians, self.outlier)
            rows.append(torch.stack([self.scales[b].z(values[b]) for b in self.blocks], 1))
        return torch.cat(rows) if rows else torch.empty(0, len(self.blocks))

    def scores(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[float]:
        """Each image's typicality score (the largest of its blocks' z-scores; higher is less like a chest)."""
        if not isinstance(images, torch.Tensor) and len(images) == 0:
            return []
        return [round(float(s), 4) for s in self.combine(self.block_scores(images))]

    def combine(self, blocks: torch.Tensor) -> torch.Tensor:
        """(N,) typicality scores from (N, len(self.blocks)) block z-scores: the largest, each block's scaled to its
        own threshold when the gate has per-block thresholds."""
        if self.block_scale is not None:
            blocks = blocks * self.block_scale.to(blocks.dtype)
        return blocks.max(1).values

    def refuses(self, score: float) -> bool:
        return not math.isfinite(score) or score > self.threshold

    def reason(self, score: float) -> str:
        return f"not like a chest radiograph: typicality {score:.2f} > {self.threshold:.2f}"

    def state(self) -> dict[str, Any]:
        """What ``save_gate`` writes (weights in fp16)."""
        return {
            "format": FORMAT,
            "version": self.version,
            "width": self.network.width,
            "input_norm": self.network.encoder.input_norm,
            "encoder": {k: v.half() for k, v in self.network.encoder.state_dict().items()},
            "decoder": {k: v.half() for k, v in self.network.decoder.state_dict().items()},
            "gaussians": {k: g.state() for k, g in self.gaussians.items()},
            "outlier": self.outlier.state() if self.outlier is not None else None,
            "scales": {k: [s.median, s.spread] for k, s in self.scales.items()},
            "validation_scores": self.validation_scores,
            **(
                {"validation_block_scores": self.validation_block_scores}
                if self.validation_block_scores is not None
                else {}
            ),
            **({"block_quantiles": self.block_quantiles} if self.block_scale is not None else {}),
        }


def as_stored(network: Autoencoder, gaussians: dict[str, GaussianModel]) -> dict[str, GaussianModel]:
    """Round ``network`` (in place) and ``gaussians`` as the gate file stores them (fp16 weights and eigenvectors).

    ``training.gate`` scales the measures and scores the validation split after this, so the threshold is set by
    the very numbers the runtime computes with a loaded gate.
    """
    network.load_state_dict({k: v.half().to(v.dtype) for k, v in network.state_dict().items()})
    return {k: GaussianModel.from_state(g.state()) for k, g in gaussians.items()}


def save_gate(gate: TypicalityGate, path: str | os.PathLike[str], provenance: dict[str, Any] | None = None) -> str:
    """Write the gate and its ``.sha256`` sidecar; returns the sha256."""
    from cxr_triage.files import write_atomic

    state = gate.state()
    state["provenance"] = dict(provenance or {})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(Path(path), data)
    write_atomic(Path(f"{path}.sha256"), f"{digest}  {Path(path).name}\n".encode())
    return digest


def load_gate(
    path: str | os.PathLike[str] | None = None, false_refusal_rate: float = 0.01, device: torch.device | str = "cpu"
) -> TypicalityGate:
    """Load a gate file (the bundled one by default), checking its sha256 sidecar when there is one."""
    path = Path(path) if path else BUNDLED_GATE
    try:
        digest = file_sha256(path)
        sidecar = Path(f"{path}.sha256")
        if sidecar.exists() and sidecar.read_text().split()[0] != digest:
            raise GateError(f"{path}: sha256 {digest[:12]} does not match {sidecar.name}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise GateError(f"cannot read the typicality gate {path}: {exc}") from exc
    except GateError:
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise GateError(f"{path} is not a typicality gate file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise GateError(f"{path} is not a typicality gate file ({FORMAT})")
    network = Autoencoder(int(state["width"]), str(state.get("input_norm", "none")))
    network.encoder.load_state_dict({k: v.float() for k, v in state["encoder"].items()})
    network.decoder.load_state_dict({k: v.float() for k, v in state["decoder"].items()})
    return TypicalityGate(
        network,
        {k: GaussianModel.from_state(v) for k, v in state["gaussians"].items()},
        {k: RobustScale(float(v[0]), float(v[1])) for k, v in state["scales"].items()},
        state["validation_scores"],
        false_refusal_rate=false_refusal_rate,
        version=str(state["version"]),
        sha256=digest,
        device=device,
        outlier=OutlierModel.from_state(state["outlier"]) if state.get("outlier") else None,
        validation_block_scores=state.get("validation_block_scores"),
        block_quantiles={k: float(v) for k, v in (state.get("block_quantiles") or {}).items()},
    )


def gate_from_settings(settings: GateSettings, device: torch.device | str = "cpu") -> TypicalityGate | None:
    """The configured gate (None when ``[gate] enabled = false``); a gate that is enabled but unreadable raises."""
    if not settings.enabled:
        return None
    return load_gate(settings.path or None, settings.false_refusal_rate, device)
