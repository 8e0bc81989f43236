"""The paper's networks: CAE encoder (Table 1), decoder (Table 2), autoencoder, and the classifier (Table 3).

Shared by the runtime and the ``training`` package. ``ModelSpec`` names an architecture completely, so a
checkpoint that stores it can rebuild the exact network.

Choices the paper leaves open, written down here:

- The decoder's last transposed convolution is followed by a sigmoid, not a ReLU: the targets lie in [0, 1].
- "same" padding for the stride-2 transposed convolutions is ``padding=1, output_padding=1`` (7 -> 14 -> ... -> 224).
- The Keras ``Reshape(49, 512)`` of a channels-last 7x7x512 map is ``flatten(2).transpose(1, 2)`` here:
  one LSTM step per spatial position, 512 features per step, in row-major order.
- ``torch.nn.LSTM`` keeps two bias vectors (``b_ih`` and ``b_hh``) where Keras keeps one, so each LSTM layer has
  ``4 * hidden`` more parameters than the paper's table (2,101,248 against 2,099,200 for the proposed head).
  ``keras_parameter_count`` reports the paper's figure.
- The hidden Dense layers use ReLU; the output layer returns logits (softmax is applied by the predictor and
  folded into the cross-entropy loss in training).
- Convolutions start from He (Kaiming) normal weights and zero biases. PyTorch's default (Kaiming uniform,
  a = sqrt(5)) shrinks the activations ~6x per ReLU layer, so after the encoder's six convolutions the features
  are ~1 % of the input's scale and training starts in a flat region (a small classifier trained from scratch
  stayed at chance in a CPU trial; with He initialisation it learned). Keras, which the paper used, defaults to
  Glorot uniform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from cxr_triage.ml.imaging import INPUT_NORMS, normalise

HEADS: tuple[str, ...] = ("lstm1_dense2", "lstm3_dense2", "lstm1_dense3", "dense5")
"""Classification heads of Table 4. ``lstm1_dense2`` is the paper's proposed head."""

DEFAULT_HEAD = "lstm1_dense2"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a classifier or autoencoder.

    ``width`` is the number of filters of the first convolution (64 in the paper); the other layers scale with
    it. Tests use small widths so that a whole pipeline runs on a CPU in seconds. ``input_norm`` is the per-image
    intensity normalisation the encoder applies to its input first (``cxr_triage.ml.imaging.normalise``): ``none``
    (the paper, and every checkpoint written before it existed) or ``equalise``.
    """

    head: str = DEFAULT_HEAD
    width: int = 64
    num_classes: int = 3
    dense_units: int = 64
    input_norm: str = "none"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; expected one of {', '.join(HEADS)}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {self.input_norm!r}; expected one of {', '.join(INPUT_NORMS)}")
        if self.width < 1 or self.num_classes < 2 or self.dense_units < 1:
            raise ValueError(f"invalid model spec {self!r}")

    @property
    def channels(self) -> tuple[int, int, int, int, int]:
        w = self.width
        return (w, 2 * w, 4 * w, 8 * w, 8 * w)

    @property
    def feature_channels(self) -> int:
        return self.channels[-1]

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelSpec:
        known = {k: data[k] for k in ("head", "width", "num_classes", "dense_units", "input_norm") if k in data}
        return cls(**known)  # type: ignore[arg-type]


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.ReLU(inplace=True)]


def he_initialise(module: nn.Module) -> None:
    """He normal weights and zero biases for every (transposed) convolution in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Encoder(nn.Sequential):
    """Table 1: six 3x3 convolutions and five 2x2 max-pools, 224x224x3 -> 7x7x(8*width).

    With ``input_norm`` other than ``none`` the input is normalised first (``normalise``); the layers themselves
    are those of the table, so iterating over the encoder yields them alone.
    """

    def __init__(self, width: int = 64, input_norm: str = "none") -> None:
        c1, c2, c3, c4, c5 = ModelSpec(width=width).channels
        super().__init__(
            *_conv(3, c1),
            *_conv(c1, c1),
            nn.MaxPool2d(2),
            *_conv(c1, c2),
            nn.MaxPool2d(2),
            *_conv(c2, c3),
            nn.MaxPool2d(2),
            *_conv(c3, c4),
            nn.MaxPool2d(2),
            *_conv(c4, c5),
            nn.MaxPool2d(2),
        )
        self.input_norm = ModelSpec(width=width, input_norm=input_norm).input_norm
        he_initialise(self)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input normalisation alone (identity for ``none``)."""
        return normalise(x, self.input_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.normalise(x))

    def blocks(self) -> list[list[nn.Module]]:
        """The five convolution blocks, each the layers up to and including a max-pool: the first is the two
        convolutions at 224x224 (3 -> w, w -> w), the others one convolution each (at 112, 56, 28 and 14)."""
        blocks: list[list[nn.Module]] = [[]]
        for layer in self:
            blocks[-1].append(layer)
            if isinstance(layer, nn.MaxPool2d):
                blocks.append([])
        return [b for b in blocks if b]


class Decoder(nn.Sequential):
    """Table 2: five stride-2 3x3 transposed convolutions, 7x7x(8*width) -> 224x224x3, sigmoid output."""

    def __init__(self, width: int = 64) -> None:
        c1, c2, c3, c4, c5 = ModelSpec(width=width).channels
        layers: list[nn.Module] = []
        for cin, cout in ((c5, c5), (c5, c3), (c3, c2), (c2, c1)):
            layers += [
                nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1, output_padding=1),
                nn.ReLU(inplace=True),
            ]
        layers += [
            nn.ConvTranspose2d(c1, 3, kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.Sigmoid(),
        ]
        super().__init__(*layers)
        he_initialise(self)


class ConvAutoencoder(nn.Module):
    """The CAE of §3.1: ``y = D(E(x))``, trained with MSE against ``x`` (normalised as the encoder normalises it).

    The layers are fully convolutional: any side that is a multiple of 32 works (training may run most epochs at
    a lower resolution).
    """

    def __init__(self, width: int = 64, input_norm: str = "none") -> None:
        super().__init__()
        self.encoder = Encoder(width, input_norm)
        self.decoder = Decoder(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the reconstruction is compared with: the input as the encoder sees it."""
        return self.encoder.normalise(x)


class _LSTMSequence(nn.Module):
    """Runs an LSTM over the 49 spatial positions and returns every step's output, flattened."""

    def __init__(self, features: int, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, features, num_layers=num_layers, batch_first=True)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(seq)
        return out.flatten(1)


def _dense_stack(in_features: int, hidden: list[int], num_classes: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for units in hidden:
        layers += [nn.Linear(in_features, units), nn.ReLU(inplace=True)]
        in_features = units
    layers.append(nn.Linear(in_features, num_classes))
    return layers


def build_head(spec: ModelSpec) -> nn.Sequential:
    """The classification head named by ``spec.head``, taking a (N, 49, C) sequence."""
    c = spec.feature_channels
    flat = 49 * c
    d = spec.dense_units
    if spec.head == "lstm1_dense2":
        return nn.Sequential(_LSTMSequence(c, 1), *_dense_stack(flat, [d], spec.num_classes))
    if spec.head == "lstm3_dense2":
        return nn.Sequential(_LSTMSequence(c, 3), *_dense_stack(flat, [d], spec.num_classes))
    if spec.head == "lstm1_dense3":
        return nn.Sequential(_LSTMSequence(c, 1), *_dense_stack(flat, [d, d], spec.num_classes))
    # dense5: four hidden Dense layers and the output layer, no LSTM.
    return nn.Sequential(nn.Flatten(1), *_dense_stack(flat, [8 * d, 4 * d, 2 * d, d], spec.num_classes))


class CAEClassifier(nn.Module):
    """Table 3: the pretrained CAE encoder, a reshape to 49 steps, and a Table 4 head. Returns logits."""

    def __init__(self, spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or ModelSpec()
        self.encoder = Encoder(self.spec.width, self.spec.input_norm)
        self.head = build_head(self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.sequence(x))

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's 7x7 map as the head's input: (N, 49, C), one step per position in row-major order."""
        return self.encoder(x).flatten(2).transpose(1, 2)

    def set_encoder_trainable(self, trainable: bool, frozen_blocks: int = 0) -> None:
        """Phase 1 of gradual unfreezing freezes the encoder; phase 2 unfreezes it, all but its first
        ``frozen_blocks`` convolution blocks (``Encoder.blocks``; 0, the paper: every layer trains). A frozen block
        has no gradient, so autograd records nothing through it and the backward pass stops after it."""
        blocks = self.encoder.blocks()
        if not 0 <= frozen_blocks <= len(blocks):
            raise ValueError(f"frozen_blocks must be 0 to {len(blocks)}, not {frozen_blocks}")
        for p in self.encoder.parameters():
            p.requires_grad_(trainable)
        for layer in (layer for block in blocks[:frozen_blocks] for layer in block):
            for p in layer.parameters():
                p.requires_grad_(False)


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def keras_parameter_count(module: nn.Module) -> int:
    """Parameter count as Keras reports it: one LSTM bias vector per layer instead of torch's two."""
    extra = sum(m.bias_hh_l0.numel() * m.num_layers for m in module.modules() if isinstance(m, nn.LSTM))
    return parameter_count(module) - extra
