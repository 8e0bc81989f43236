"""Checkpoint files: round trip, hashes, refusal of foreign or malicious files, and the missing-model message."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch

from cxr_triage import CLASS_NAMES
from cxr_triage.files import file_sha256
from cxr_triage.ml import checkpoint
from cxr_triage.ml.checkpoint import (
    FORMAT,
    CheckpointError,
    ModelCard,
    load_classifier,
    resolve_model_path,
    save_classifier,
)
from cxr_triage.ml.imaging import PREPROCESSING_VERSION
from cxr_triage.ml.model import CAEClassifier, ModelSpec

SPEC = ModelSpec(width=4, dense_units=8)


class MarkerPayload:
    """Unpickling this object would create a file: proof that a loader executed code from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


@pytest.fixture(scope="module")
def model() -> CAEClassifier:
    torch.manual_seed(0)
    return CAEClassifier(SPEC).eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def card(**overrides: object) -> ModelCard:
    values: dict[str, object] = {
        "spec": SPEC,
        "model_version": "test-1",
        "provenance": {"data": "none", "epochs": 0, "metrics": {"accuracy": None}, "tags": ["a", "b"]},
    }
    values.update(overrides)
    return ModelCard(**values)  # type: ignore[arg-type]


def test_round_trip_gives_the_same_outputs(model: CAEClassifier, batch: torch.Tensor, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_classifier(path, model, card())
    loaded = load_classifier(path)
    with torch.no_grad():
        before, after = model(batch), loaded.model(batch)
        # Exactly what fp16 storage gives ...
        reference = CAEClassifier(SPEC).eval()
        reference.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        assert torch.equal(after, reference(batch))
    # ... and close to the fp32 original.
    torch.testing.assert_close(after, before, atol=2e-3, rtol=1e-2)
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_full_precision_round_trip_is_exact(model: CAEClassifier, batch: torch.Tensor, tmp_path: Path) -> None:
    path = tmp_path / "fp32.pt"
    save_classifier(path, model, card(), dtype=None)
    with torch.no_grad():
        assert torch.equal(load_classifier(path).model(batch), model(batch))


def test_card_round_trips(model: CAEClassifier, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_classifier(path, model, card())
    loaded = load_classifier(path)
    assert loaded.card == card()
    assert loaded.card.class_names == CLASS_NAMES
    assert loaded.card.preprocessing_version == PREPROCESSING_VERSION
    assert loaded.path == path


def test_sha256_is_the_file_hash(model: CAEClassifier, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    returned = save_classifier(path, model, card())
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert returned == expected == file_sha256(path) == load_classifier(path).sha256
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"], "no temporary file left behind"


def test_pickled_code_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "kind": "classifier", "payload": MarkerPayload(marker)}, evil, pickle_protocol=2)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(MarkerPayload(marker), protocol=2))
    for path in (evil, plain):
        with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
            load_classifier(path)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler would have run it.
    pickle.loads(plain.read_bytes())
    assert marker.exists()


def test_other_files_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"format": "someone-else/3", "state_dict": {}}, other)
    autoencoder = tmp_path / "cae.pt"
    torch.save({"format": FORMAT, "kind": "autoencoder"}, autoencoder)
    for path in (text, other, autoencoder, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError):
            load_classifier(path)


def test_other_preprocessing_version_is_refused(model: CAEClassifier, tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    save_classifier(path, model, card(preprocessing_version="cxr-pp/0"))
    with pytest.raises(CheckpointError, match="cxr-pp/0"):
        load_classifier(path)


def test_weights_that_do_not_fit_the_spec_are_refused(model: CAEClassifier, tmp_path: Path) -> None:
    path = tmp_path / "lying.pt"
    save_classifier(path, model, card(spec=ModelSpec(width=8, dense_units=8)))
    with pytest.raises(CheckpointError, match="do not match"):
        load_classifier(path)


def test_card_checks_class_names_against_outputs() -> None:
    with pytest.raises(CheckpointError):
        ModelCard(spec=SPEC, class_names=("a", "b"))


def test_missing_bundled_model_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "BUNDLED_MODEL", tmp_path / "models" / "cae_lstm.pt")
    with pytest.raises(CheckpointError) as info:
        resolve_model_path(None)
    message = str(info.value)
    assert "bundled model" in message and "python -m training" in message and "--model" in message


def test_model_path_is_resolved(model: CAEClassifier, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_classifier(path, model, card())
    assert resolve_model_path(path) == path
    with pytest.raises(CheckpointError, match="nothing.pt"):
        resolve_model_path(tmp_path / "nothing.pt")
