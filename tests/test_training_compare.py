"""``python -m training compare``: two checkpoints evaluated as ``evaluate`` does, then the product's shipping rule.

A width-4 classifier trained for a few head-only epochs on synthetic chest phantoms whose brightness says their
class (the challenger) against the same network untrained (the champion), on the CPU; the rejected case edits the
metrics.json files the first comparison wrote, which the command also compares without recomputing.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from synthetic_pack import write_synthetic_pack

from cxr_triage import CLASS_NAMES
from cxr_triage.ml.checkpoint import ModelCard, save_classifier
from cxr_triage.ml.model import CAEClassifier, ModelSpec
from training import cli

pytestmark = pytest.mark.xdist_group("training_compare")  # one worker: the pack and the two models built once

RUN = ["--device", "cpu", "--no-amp", "--no-progress", "--log-level", "WARNING", "--eval-batch-size", "16"]
MODEL = ["--width", "4", "--dense-units", "32", "--input-norm", "none"]  # none: the brightness is the class


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(pack, champion, challenger): 90 synthetic images; an untrained champion; a challenger trained on them."""
    folder = tmp_path_factory.mktemp("compare")
    pack = write_synthetic_pack(folder, "images", "g")
    torch.manual_seed(7)
    champion = folder / "champion.pt"
    untrained = CAEClassifier(ModelSpec(width=4, dense_units=32, input_norm="none"))
    save_classifier(champion, untrained, ModelCard(spec=untrained.spec, model_version="untrained-1"))
    train = ["finetune", "--pack", str(pack), "--out", str(folder / "ft"), *MODEL, *RUN, "--phase1-epochs", "8"]
    train += ["--phase1-lr", "3e-3", "--phase1-batch-size", "8", "--phase2-epochs", "0", "--no-balance-sources"]
    assert cli.main([*train, "--model-version", "trained-1"]) == 0
    return pack, champion, folder / "ft" / "model.pt"


def _compare(out: Path, *pair: str) -> dict[str, Any]:
    assert cli.main(["compare", *pair, "--out", str(out), *RUN]) == 0
    return json.loads((out / "compare.json").read_text())


@pytest.fixture(scope="module")
def compared(models: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The two checkpoints compared once: the output folder and what the command printed."""
    pack, champion, challenger = models
    out = tmp_path_factory.mktemp("compared")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        _compare(out, "--champion", str(champion), "--challenger", str(challenger), "--pack", str(pack))
    return out, printed.getvalue()


def _line(text: str, figure: str) -> list[str]:
    """The printed table's cells (champion, challenger, change) of one figure."""
    found = [line for line in text.splitlines() if line.startswith(f"{figure} ")]
    assert len(found) == 1, (figure, text)
    return found[0][len(figure) :].split()


def _figures(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The table's figures, read from an evaluate metrics.json's ``metrics``."""
    figures = {"accuracy": metrics["accuracy"], "macro AUC": metrics["macro"]["auc"]}
    for name in CLASS_NAMES:
        figures[f"sensitivity {name}"] = metrics["per_class"][name]["sensitivity"]
        figures[f"AUC {name}"] = metrics["per_class"][name]["auc"]
    return figures


def test_a_better_challenger_replaces_the_champion(
    models: tuple[Path, Path, Path], compared: tuple[Path, str], tmp_path: Path
) -> None:
    pack, champion, challenger = models
    out, printed = compared
    result = json.loads((out / "compare.json").read_text())

    # each checkpoint evaluated on the validation split as `evaluate` does: the same figures as evaluate's own
    for role, model in (("champion", champion), ("challenger", challenger)):
        argv = ["evaluate", "--pack", str(pack), "--model", str(model), "--split", "val", "--out", str(tmp_path / role)]
        assert cli.main([*argv, *RUN]) == 0
        alone = json.loads((tmp_path / role / "metrics.json").read_text())["metrics"]
        inside = json.loads((out / role / "metrics.json").read_text())["metrics"]
        del alone["images_per_second"], inside["images_per_second"]  # the one figure that is not the model's
        assert inside == alone and inside["split"] == "val"
        assert {row["figure"]: row[role] for row in result["table"]} == pytest.approx(_figures(alone))
        assert result["images"] == alone["images"]

    assert result["split"] == "val" and (result["margin"], result["sensitivity_tolerance"]) == (0.0, 0.02)
    table = {row["figure"]: row for row in result["table"]}
    assert table["macro AUC"]["challenger"] > table["macro AUC"]["champion"]
    assert result["decision"]["promote"] is True and result["decision"]["reason"].startswith("macro AUC ")
    assert "decision: the challenger replaces the champion" in printed
    for figure, row in table.items():  # the printed table holds the same figures
        before, after, change = _line(printed, figure)
        assert (before, after) == (f"{row['champion']:.4f}", f"{row['challenger']:.4f}")
        assert change == f"{row['challenger'] - row['champion']:+.4f}"

    # the two metrics.json files compared as they are: the same decision; a margin above the gain rejects it
    files = ["--champion-metrics", str(out / "champion" / "metrics.json")]
    files += ["--challenger-metrics", str(out / "challenger" / "metrics.json")]
    again = _compare(tmp_path / "files", *files)
    assert again["decision"] == result["decision"] and again["table"] == result["table"]
    gain = table["macro AUC"]["challenger"] - table["macro AUC"]["champion"]
    higher = _compare(tmp_path / "margin", *files, "--margin", f"{gain + 0.01}")
    assert higher["decision"]["promote"] is False and "less than the margin" in higher["decision"]["reason"]


def _edited(source: Path, target: Path, macro_auc: float, pneumonia_sensitivity: float) -> Path:
    """``source`` (an evaluate metrics.json) with its macro AUC and pneumonia sensitivity replaced."""
    payload = json.loads(source.read_text())
    payload["metrics"]["macro"]["auc"] = macro_auc
    payload["metrics"]["per_class"]["pneumonia"]["sensitivity"] = pneumonia_sensitivity
    target.write_text(json.dumps(payload))
    return target


def test_a_challenger_that_misses_a_class_is_rejected(
    compared: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # one evaluation's figures twice: the challenger's macro AUC higher, its pneumonia sensitivity 0.05 lower
    source = compared[0] / "champion" / "metrics.json"
    champion = _edited(source, tmp_path / "champion.json", 0.9, 0.85)
    challenger = _edited(source, tmp_path / "challenger.json", 0.99, 0.8)
    files = ["--champion-metrics", str(champion), "--challenger-metrics", str(challenger)]
    result = _compare(tmp_path / "out", *files)
    printed = capsys.readouterr().out
    assert result["decision"]["promote"] is False
    assert result["decision"]["reason"] == "pneumonia sensitivity fell 0.0500 (0.850 -> 0.800), more than 0.02"
    assert "decision: the champion stays" in printed and "reason: pneumonia sensitivity fell 0.0500" in printed
    assert _line(printed, "macro AUC") == ["0.9000", "0.9900", "+0.0900"]
    assert _line(printed, "sensitivity pneumonia") == ["0.8500", "0.8000", "-0.0500"]
    assert _line(printed, "sensitivity covid")[2] == "+0.0000"
    # a tolerance wider than the fall lets the better macro AUC through
    wider = _compare(tmp_path / "wider", *files, "--sensitivity-tolerance", "0.06")
    assert wider["decision"]["promote"] is True


def test_metrics_of_other_images_or_half_a_pair_are_refused(
    models: tuple[Path, Path, Path], compared: tuple[Path, str], tmp_path: Path
) -> None:
    champion_file = compared[0] / "champion" / "metrics.json"
    other = json.loads((compared[0] / "challenger" / "metrics.json").read_text())
    other["metrics"]["split"] = "test"
    other_file = tmp_path / "test.json"
    other_file.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="same images"):
        _compare(tmp_path / "x", "--champion-metrics", str(champion_file), "--challenger-metrics", str(other_file))
    with pytest.raises(SystemExit, match="compare needs"):
        _compare(tmp_path / "y", "--champion", str(models[1]), "--challenger-metrics", str(champion_file))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_compare_is_listed_in_the_help() -> None:
    assert "compare" in cli.build_parser().format_help()
