"""Phase 1's feature computation is resumable (``training.features``).

A computation stopped part-way (a fault right after a checkpoint, or the deadline) resumes at the next unfinished
batch and ends with exactly the features, and the phase-1 result, of an uninterrupted one; a finished bank is
loaded, not recomputed; a bank computed from anything else is not reused.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from test_training_run import TINY, tiny_pack  # noqa: F401  (fixture)

from cxr_triage.ml.model import Encoder
from training import cli, commands, finetune
from training.data import ImageSet
from training.engine import Deadline, Runtime, setup_runtime
from training.features import FOLDER, INDEX, FeatureBank, FeatureStore, bank_identity

RT = Runtime(device=torch.device("cpu"), progress=False)
SPEC = {"width": 2}


class Interrupted(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def _data() -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (22, 224, 224), dtype=torch.uint8, generator=gen)
    return ImageSet(images, torch.arange(22) % 3, torch.zeros(22, dtype=torch.int64))


def _encoder(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(width=2)


def _store(folder: Path, encoder: Encoder, data: ImageSet, idx: torch.Tensor, batch_size: int = 4) -> FeatureStore:
    identity = bank_identity(encoder, SPEC, data.images, idx, batch_size, "float32")
    return FeatureStore(folder, identity, idx, every=0.0)


def _interrupt_after_first_save(monkeypatch: pytest.MonkeyPatch) -> None:
    original = FeatureStore.save

    def save_then_die(self: FeatureStore, *args: object) -> None:
        original(self, *args)  # type: ignore[arg-type]
        raise Interrupted

    monkeypatch.setattr(FeatureStore, "save", save_then_die)


def test_an_interrupted_bank_resumes_at_the_next_batch_with_the_same_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, encoder, idx = _data(), _encoder(), torch.arange(1, 21)  # 20 images: 5 batches of 4
    reference = FeatureBank(encoder, data, idx, RT, 4)
    assert reference.complete and reference.computed_batches == 5

    with monkeypatch.context() as patch:
        _interrupt_after_first_save(patch)
        with pytest.raises(Interrupted):
            FeatureBank(encoder, data, idx, RT, 4, _store(tmp_path, encoder, data, idx))
    index = torch.load(tmp_path / INDEX, weights_only=True)
    assert index["batches"] == 1 and index["total_batches"] == 5 and torch.equal(index["indices"], idx)
    assert index["identity"]["batch_size"] == 4 and index["identity"]["spec"] == SPEC

    resumed = FeatureBank(encoder, data, idx, RT, 4, _store(tmp_path, encoder, data, idx))
    assert (resumed.loaded_batches, resumed.computed_batches, resumed.complete) == (1, 4, True)
    assert torch.equal(resumed.features, reference.features)
    assert torch.equal(resumed.inputs(idx[7:9])[0], reference.inputs(idx[7:9])[0])

    again = FeatureBank(encoder, data, idx, RT, 4, _store(tmp_path, encoder, data, idx))
    assert (again.loaded_batches, again.computed_batches) == (5, 0)  # a finished bank is not computed again
    assert torch.equal(again.features, reference.features)


def test_the_deadline_stops_the_bank_between_batches_and_keeps_what_was_done(tmp_path: Path) -> None:
    data, encoder, idx = _data(), _encoder(), torch.arange(20)
    store = _store(tmp_path, encoder, data, idx)
    store.every = 3600.0  # no periodic checkpoint: the stop alone writes
    stopped = FeatureBank(encoder, data, idx, RT, 4, store, Deadline(0.0))
    assert not stopped.complete and stopped.computed_batches == 1
    assert torch.load(tmp_path / INDEX, weights_only=True)["batches"] == 1
    resumed = FeatureBank(encoder, data, idx, RT, 4, _store(tmp_path, encoder, data, idx), Deadline())
    assert (resumed.loaded_batches, resumed.complete) == (1, True)
    assert torch.equal(resumed.features, FeatureBank(encoder, data, idx, RT, 4).features)


@pytest.mark.parametrize("change", ["encoder", "images", "indices", "batch_size", "no_resume"])
def test_a_bank_computed_from_anything_else_is_not_reused(tmp_path: Path, change: str) -> None:
    data, encoder, idx = _data(), _encoder(), torch.arange(20)
    FeatureBank(encoder, data, idx, RT, 4, _store(tmp_path, encoder, data, idx))
    batch_size = 5 if change == "batch_size" else 4
    if change == "encoder":
        encoder = _encoder(seed=1)
    elif change == "images":
        data.images[3] = 255 - data.images[3]
    elif change == "indices":
        idx = torch.arange(1, 21)
    store = _store(tmp_path, encoder, data, idx, batch_size)
    store.resume = change != "no_resume"
    bank = FeatureBank(encoder, data, idx, RT, batch_size, store)
    assert bank.loaded_batches == 0 and bank.computed_batches == bank.total_batches
    assert torch.equal(bank.features, FeatureBank(encoder, data, idx, RT, batch_size).features)
    assert torch.load(tmp_path / INDEX, weights_only=True)["identity"] == store.identity


def _finetune_args(pack: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--pack", str(pack), "--out", str(out), *TINY, "--phase1-batch-size", "8",
            "--eval-batch-size", "8", "--phase1-epochs", "2", "--phase2-epochs", "0", "--checkpoint-seconds", "0",
            *extra]  # fmt: skip


def _run(argv: list[str]) -> finetune.FinetuneResult:
    args = cli.parse_args(argv)
    rt = setup_runtime("cpu", progress=False)
    return finetune.run_finetune(args, rt, commands.load_data(args, rt))


def test_phase1_stopped_while_computing_features_resumes_to_the_same_result(
    tiny_pack: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference = _run(_finetune_args(tiny_pack, tmp_path / "whole"))
    banks: list[FeatureBank] = []

    class Spy(FeatureBank):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            banks.append(self)

    monkeypatch.setattr(finetune, "FeatureBank", Spy)
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _interrupt_after_first_save(patch)
        with pytest.raises(Interrupted):
            _run(_finetune_args(tiny_pack, out))
    assert torch.load(out / FOLDER / INDEX, weights_only=True)["batches"] == 1
    assert not (out / "finetune_state.pt").exists()

    resumed = _run(_finetune_args(tiny_pack, out, "--resume"))
    assert (banks[-1].loaded_batches, banks[-1].complete) == (1, True) and banks[-1].computed_batches >= 1
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in reference.history]
    for name, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert not (out / FOLDER).exists()  # phase 1 has ended: its features are removed


def test_a_finished_bank_is_kept_until_phase1_ends(
    tiny_pack: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, started = tmp_path / "ft", time.monotonic()
    with monkeypatch.context() as patch:
        patch.setattr(finetune, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(Interrupted()))
        with pytest.raises(Interrupted):
            _run(_finetune_args(tiny_pack, out))
    index = torch.load(out / FOLDER / INDEX, weights_only=True)
    assert index["batches"] == index["total_batches"] and 0.0 < index["seconds"] < time.monotonic() - started
    computed: list[int] = []
    original = FeatureBank._encode

    def spy(self: FeatureBank, *args: object) -> int:
        done = original(self, *args)  # type: ignore[arg-type]
        computed.append(done - self.loaded_batches)
        return done

    monkeypatch.setattr(FeatureBank, "_encode", spy)
    result = _run(_finetune_args(tiny_pack, out, "--resume"))
    assert computed == [0] and [h["epoch"] for h in result.history] == [1, 2]
    assert result.phase_seconds["phase1_features"] == pytest.approx(index["seconds"], abs=1.0)
    assert not (out / FOLDER).exists()
