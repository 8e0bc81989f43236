"""The paper's networks (the paper's Tables 1-4): parameter counts, shapes, heads, freezing.

Full-width shapes are checked on the ``meta`` device (shapes without arithmetic); forward passes with real numbers
use tiny widths so the whole module runs in seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxr_triage.ml.model import (
    HEADS,
    CAEClassifier,
    ConvAutoencoder,
    Decoder,
    Encoder,
    ModelSpec,
    keras_parameter_count,
    parameter_count,
)

TINY = {"width": 4, "dense_units": 8}


def keras_lstm(units: int, inputs: int) -> int:
    """Keras LSTM parameters: four gates, each with input and recurrent kernels and one bias."""
    return 4 * (units * (units + inputs) + units)


def dense(inputs: int, units: int) -> int:
    return inputs * units + units


# --- parameter counts (no forward pass needed) -------------------------------------------------------------------


def test_encoder_parameters_match_table_1() -> None:
    assert parameter_count(Encoder(64)) == 3_947_712


def test_decoder_parameters_match_table_2() -> None:
    assert parameter_count(Decoder(64)) == 3_910_275


def test_autoencoder_is_encoder_plus_decoder() -> None:
    assert parameter_count(ConvAutoencoder(64)) == 3_947_712 + 3_910_275


def test_classifier_parameters_match_table_3() -> None:
    model = CAEClassifier(ModelSpec())
    assert keras_parameter_count(model) == 7_652_803
    lstm = next(m for m in model.modules() if isinstance(m, nn.LSTM))
    assert parameter_count(lstm) == 2_101_248  # torch keeps b_ih and b_hh ...
    assert keras_parameter_count(lstm) == 2_099_200  # ... Keras one bias: the paper's figure
    assert parameter_count(model) == 7_654_851


def test_phase_one_freezes_exactly_the_encoder() -> None:
    model = CAEClassifier(ModelSpec())
    model.set_encoder_trainable(False)
    assert parameter_count(model, trainable_only=True) == 7_654_851 - 3_947_712
    assert all(not p.requires_grad for p in model.encoder.parameters())
    model.set_encoder_trainable(True)
    assert parameter_count(model, trainable_only=True) == 7_654_851


@pytest.mark.parametrize(
    ("head", "head_parameters"),
    [
        ("lstm1_dense2", keras_lstm(512, 512) + dense(25_088, 64) + dense(64, 3)),
        ("lstm3_dense2", 3 * keras_lstm(512, 512) + dense(25_088, 64) + dense(64, 3)),
        ("lstm1_dense3", keras_lstm(512, 512) + dense(25_088, 64) + dense(64, 64) + dense(64, 3)),
        (
            "dense5",
            dense(25_088, 512) + dense(512, 256) + dense(256, 128) + dense(128, 64) + dense(64, 3),
        ),
    ],
)
def test_table_4_heads_have_their_layers(head: str, head_parameters: int) -> None:
    """Each Table 4 variant counted layer by layer from its description (Keras conventions)."""
    model = CAEClassifier(ModelSpec(head=head))
    assert keras_parameter_count(model) == 3_947_712 + head_parameters
    lstms = [m for m in model.head.modules() if isinstance(m, nn.LSTM)]
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert sum(m.num_layers for m in lstms) == {"lstm3_dense2": 3, "dense5": 0}.get(head, 1)
    assert len(linears) == {"dense5": 5, "lstm1_dense3": 3}.get(head, 2)


def test_heads_constant_lists_every_head() -> None:
    assert set(HEADS) == {"lstm1_dense2", "lstm3_dense2", "lstm1_dense3", "dense5"}


# --- shapes -----------------------------------------------------------------------------------------------------


def test_full_width_shapes() -> None:
    with torch.device("meta"):
        x = torch.empty(2, 3, 224, 224)
        assert CAEClassifier(ModelSpec()).encoder(x).shape == (2, 512, 7, 7)  # 7x7x512 features
        assert ConvAutoencoder(64)(x).shape == (2, 3, 224, 224)
        assert CAEClassifier(ModelSpec())(x).shape == (2, 3)  # the other heads: tiny widths below


@pytest.mark.parametrize("head", HEADS)
def test_tiny_head_runs_and_learns(head: str) -> None:
    torch.manual_seed(0)
    model = CAEClassifier(ModelSpec(head=head, **TINY))
    x = torch.rand(2, 3, 224, 224)
    logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tiny_autoencoder_reconstructs_in_unit_range() -> None:
    torch.manual_seed(0)
    cae = ConvAutoencoder(4)
    with torch.no_grad():
        y = cae(torch.rand(1, 3, 224, 224))
    assert y.shape == (1, 3, 224, 224)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0  # sigmoid output, like the targets


def test_frozen_encoder_gets_no_gradient() -> None:
    model = CAEClassifier(ModelSpec(**TINY))
    model.set_encoder_trainable(False)
    model(torch.rand(1, 3, 224, 224)).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_phase2_frozen_blocks_get_no_gradient_and_the_rest_do() -> None:
    model = CAEClassifier(ModelSpec(**TINY))
    blocks = model.encoder.blocks()
    assert [sum(isinstance(m, nn.Conv2d) for m in b) for b in blocks] == [2, 1, 1, 1, 1]
    assert all(isinstance(b[-1], nn.MaxPool2d) for b in blocks)
    model.set_encoder_trainable(True, frozen_blocks=2)
    model(torch.rand(1, 3, 224, 224)).sum().backward()
    frozen = {id(p) for b in blocks[:2] for m in b for p in m.parameters()}
    assert len(frozen) == 6  # three convolutions, weight and bias each
    for p in model.encoder.parameters():
        assert (p.grad is None) == (id(p) in frozen)
    model.set_encoder_trainable(True)
    assert all(p.requires_grad for p in model.encoder.parameters())
    with pytest.raises(ValueError, match="frozen_blocks"):
        model.set_encoder_trainable(True, frozen_blocks=6)


def test_sequence_is_keras_reshape_of_channels_last_features() -> None:
    """Keras' Reshape(49, 512) of a 7x7x512 map: one step per position in row-major order, channels as features."""
    torch.manual_seed(0)
    model = CAEClassifier(ModelSpec(**TINY)).eval()
    seen: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        model(x)
        features = model.encoder(x)
    keras_sequence = features.permute(0, 2, 3, 1).reshape(2, 49, features.shape[1])
    assert torch.equal(seen[0], keras_sequence)


def test_lstm_output_of_every_step_is_flattened() -> None:
    model = CAEClassifier(ModelSpec(**TINY))
    first_dense = next(m for m in model.head if isinstance(m, nn.Linear))
    assert first_dense.in_features == 49 * model.spec.feature_channels


# --- ModelSpec ----------------------------------------------------------------------------------------------------


def test_model_spec_round_trips_and_validates() -> None:
    spec = ModelSpec(head="dense5", width=8, dense_units=16)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.channels == (8, 16, 32, 64, 64)
    with pytest.raises(ValueError, match="unknown head"):
        ModelSpec(head="lstm9")
    with pytest.raises(ValueError):
        ModelSpec(width=0)
