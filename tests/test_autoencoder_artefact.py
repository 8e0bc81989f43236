"""Pretraining accumulates across runs: the committed autoencoder artefact, stretches, a lower side, resuming.

Width 4 on a few dozen real shared images (the ``tiny_pack`` of ``test_training_run``), on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training_run import TINY, tiny_pack  # noqa: F401  (fixture)

from cxr_triage.ml.model import CAEClassifier, ConvAutoencoder, ModelSpec
from training import cli
from training.autoencoder import AutoencoderFileError, load_autoencoder
from training.pretrain import load_encoder


def _pretrain(pack: Path, out: Path, *extra: str) -> None:
    args = ["pretrain", "--pack", str(pack), "--out", str(out), *TINY, "--pretrain-batch-size", "8"]
    assert cli.main([*args, "--eval-batch-size", "16", *extra]) == 0


def test_stretches_accumulate_in_the_artefact(tiny_pack: Path, tmp_path: Path) -> None:  # noqa: F811
    artefact = tmp_path / "ae.pt"
    _pretrain(tiny_pack, tmp_path / "s0", "--pretrain-epochs", "2", "--pretrain-size", "64",
              "--export-autoencoder", str(artefact))  # fmt: skip
    first = load_autoencoder(artefact)
    assert first.input_norm == "equalise" and first.width == 4
    assert [r["epoch"] for r in first.history] == [1, 2]
    assert all(r["size"] == 64 and r["stretch"] == 0 for r in first.history)
    assert first.stretches[0]["from_artefact"] is False and first.stretches[0]["machine"]
    assert first.best_val_mse == min(r["val_mse"] for r in first.history)
    assert all(v.dtype == torch.float16 for v in torch.load(artefact, weights_only=True)["encoder"].values())

    _pretrain(tiny_pack, tmp_path / "s1", "--pretrain-epochs", "2", "--pretrain-lr", "3e-3",
              "--init-autoencoder", str(artefact), "--export-autoencoder", str(artefact))  # fmt: skip
    second = load_autoencoder(artefact)
    if second.best_val_mse < first.best_val_mse:  # exported only when it improved
        assert [r["epoch"] for r in second.history] == [1, 2, 3, 4]
        assert [s["stretch"] for s in second.stretches] == [0, 1]
        assert second.stretches[1]["fresh_optimizer_moments"] is True
        assert second.history[2]["size"] == 224
    else:
        assert second.history == first.history

    model = CAEClassifier(ModelSpec(width=4, dense_units=8, input_norm="equalise"))
    load_encoder(model, artefact)
    assert torch.equal(model.encoder[0].weight, second.encoder["0.weight"])


def test_the_artefact_refuses_a_model_it_does_not_fit(tiny_pack: Path, tmp_path: Path) -> None:  # noqa: F811
    artefact = tmp_path / "ae.pt"
    _pretrain(tiny_pack, tmp_path / "s0", "--pretrain-epochs", "1", "--pretrain-size", "32",
              "--export-autoencoder", str(artefact))  # fmt: skip
    loaded = load_autoencoder(artefact)
    with pytest.raises(AutoencoderFileError, match="input_norm"):
        loaded.load_into(ConvAutoencoder(4, "none"))
    with pytest.raises(AutoencoderFileError, match="does not fit"):
        loaded.load_into(ConvAutoencoder(8, "equalise"))
    with pytest.raises(SystemExit, match="input_norm"):
        load_encoder(CAEClassifier(ModelSpec(width=4, dense_units=8)), artefact)


def test_resume_continues_a_stretch_without_counting_it_twice(tiny_pack: Path, tmp_path: Path) -> None:  # noqa: F811
    artefact = tmp_path / "ae.pt"
    _pretrain(tiny_pack, tmp_path / "s0", "--pretrain-epochs", "1", "--pretrain-size", "64",
              "--export-autoencoder", str(artefact))  # fmt: skip
    out, more = tmp_path / "s1", ("--pretrain-size", "64", "--pretrain-lr", "3e-3")
    link = ("--init-autoencoder", str(artefact), "--export-autoencoder", str(artefact))
    _pretrain(tiny_pack, out, "--pretrain-epochs", "1", *more, *link)
    _pretrain(tiny_pack, out, "--pretrain-epochs", "2", *more, *link, "--resume")
    state = torch.load(out / "pretrain_state.pt", weights_only=True)
    assert [r["epoch"] for r in state["history"]] == [1, 2]
    assert state["stretch"]["size"] == 64 and state["stretch"]["base"]["epochs"] == 1
    final = load_autoencoder(artefact)
    exported = len(final.stretches) == 2  # stretch 1 is written only if it improved on stretch 0
    assert [s["stretch"] for s in final.stretches] == ([0, 1] if exported else [0])
    assert [(r["stretch"], r["epoch"]) for r in final.history] == ([(0, 1), (1, 2), (1, 3)] if exported else [(0, 1)])


def test_resuming_a_fresh_stretch_with_its_own_export_does_not_count_it_twice(
    tiny_pack: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A stretch that began without an artefact, resumed with --init-autoencoder naming the artefact it wrote
    itself (the command documented for continuing): its epochs stay stretch 0's, once."""
    artefact, out = tmp_path / "ae.pt", tmp_path / "s0"
    link = ("--pretrain-size", "64", "--export-autoencoder", str(artefact))
    _pretrain(tiny_pack, out, "--pretrain-epochs", "1", *link)
    _pretrain(tiny_pack, out, "--pretrain-epochs", "2", *link, "--init-autoencoder", str(artefact), "--resume")
    final = load_autoencoder(artefact)
    assert [s["stretch"] for s in final.stretches] == [0]
    assert [(r["stretch"], r["epoch"]) for r in final.history] == [(0, 1), (0, 2)]
