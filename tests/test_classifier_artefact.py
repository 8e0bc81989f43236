"""Fine-tuning accumulates across runs like pretraining: the committed classifier artefact (``training.classifier``).

Width 4 on a few dozen real shared images (the ``tiny_pack`` of ``test_training_run``), on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training_run import TINY, tiny_pack  # noqa: F401  (fixture)

from cxr_triage.ml.checkpoint import load_classifier
from training import cli
from training.classifier import FORMAT, accumulated


def _finetune(pack: Path, out: Path, *extra: str) -> None:
    args = ["finetune", "--pack", str(pack), "--out", str(out), *TINY, "--phase1-batch-size", "8"]
    assert cli.main([*args, "--phase2-batch-size", "8", "--eval-batch-size", "16", *extra]) == 0


def _pretrained(pack: Path, tmp_path: Path) -> Path:
    artefact = tmp_path / "ae.pt"
    args = ["pretrain", "--pack", str(pack), "--out", str(tmp_path / "pre"), *TINY, "--pretrain-batch-size", "8"]
    assert (
        cli.main([*args, "--pretrain-epochs", "1", "--pretrain-size", "64", "--export-autoencoder", str(artefact)]) == 0
    )
    return artefact


def test_stretches_accumulate_in_the_classifier_artefact(tiny_pack: Path, tmp_path: Path) -> None:  # noqa: F811
    encoder, artefact = _pretrained(tiny_pack, tmp_path), tmp_path / "classifier.pt"
    _finetune(tiny_pack, tmp_path / "s0", "--encoder", str(encoder), "--phase1-epochs", "1", "--phase2-epochs", "1",
              "--export-classifier", str(artefact))  # fmt: skip
    first = load_classifier(artefact)
    record = accumulated(first.card)
    assert record is not None and record["format"] == FORMAT
    assert [(r["phase"], r["epoch"], r["stretch"]) for r in record["history"]] == [(1, 1, 0), (2, 1, 0)]
    assert record["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in record["history"]))
    stretch = record["stretches"][0]
    assert stretch["from_artefact"] is False and stretch["machine"] and stretch["encoder"]["epochs"] == 1
    assert [p["lr"] for p in stretch["phases"]] == [1e-3, 1e-4]
    raw = torch.load(artefact, weights_only=True)
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())

    # a second stretch continues the artefact in phase 2, with fresh moments; written only if it improved
    _finetune(tiny_pack, tmp_path / "s1", "--init-classifier", str(artefact), "--phase1-epochs", "0",
              "--phase2-epochs", "1", "--phase2-lr", "3e-3", "--export-classifier", str(artefact))  # fmt: skip
    second = accumulated(load_classifier(artefact).card)
    assert second is not None
    state = torch.load(tmp_path / "s1" / "finetune_state.pt", weights_only=True)
    ran = [(h["phase"], h["epoch"]) for h in state["history"]]
    assert ran == [(2, 1)]  # no phase 1 with --phase1-epochs 0
    assert state["stretch"]["fresh_optimizer_moments"] is True and state["stretch"]["base"]["best_val_loss"] == (
        pytest.approx(record["best_val_loss"])
    )
    if second["best_val_loss"] < record["best_val_loss"]:
        assert [s["stretch"] for s in second["stretches"]] == [0, 1]
        assert [r["epoch_overall"] for r in second["history"]] == [1, 2, 3]
    else:
        assert second == record


def test_the_artefact_refuses_another_model(tiny_pack: Path, tmp_path: Path) -> None:  # noqa: F811
    artefact = tmp_path / "classifier.pt"
    _finetune(tiny_pack, tmp_path / "s0", "--phase1-epochs", "1", "--phase2-epochs", "0",
              "--export-classifier", str(artefact))  # fmt: skip
    with pytest.raises(SystemExit, match="this run builds"):
        _finetune(tiny_pack, tmp_path / "s1", "--init-classifier", str(artefact), "--dense-units", "16")
