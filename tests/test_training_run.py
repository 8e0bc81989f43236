"""Training runs on the CPU with a tiny model (width 4) and a few dozen real shared images at 224x224.

Covers: gradual unfreezing (phase 1 leaves the encoder untouched), resuming, the one-shot command end to end
(checkpoint, metrics, report, plots, ablation, evaluate, resume), the time budget, and DDP with two gloo processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cxr_triage import CLASS_NAMES
from cxr_triage.ml.checkpoint import load_classifier
from cxr_triage.ml.inference import Predictor
from cxr_triage.ml.model import CAEClassifier, ModelSpec
from cxr_triage.testing.peers import free_port
from training import cli, commands, finetune, pretrain
from training.engine import setup_runtime
from training.metrics import classification_metrics

pytestmark = pytest.mark.xdist_group("training_run")  # one worker: the tiny pack built once

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr"
TINY = ["--width", "4", "--dense-units", "8", "--device", "cpu", "--no-progress", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 real images (10 per class) from the shared data, packed."""
    folder = tmp_path_factory.mktemp("tinypack")
    with open(SHARED / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(folder / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group", "patient_id", "source"])
        w.writeheader()
        for name in CLASS_NAMES:
            in_class = [r for r in rows if r["label"] == name]
            for r in in_class[7 :: len(in_class) // 10][:10]:
                w.writerow({k: r[k] for k in ("path", "label", "group", "patient_id", "source")})
    pack = folder / "tiny.pack"
    assert (
        cli.main(
            [
                "pack",
                "--manifest",
                str(folder / "labels.csv"),
                "--root",
                str(SHARED),
                "--out",
                str(pack),
                "--max-mib",
                "2",
                "--no-progress",
                "--log-level",
                "WARNING",
            ]
        )
        == 0
    )
    return pack


def _encoder_file(path: Path, width: int = 4) -> dict[str, torch.Tensor]:
    """An encoder file as pretrain writes it (the flags' default normalisation, equalise)."""
    torch.manual_seed(123)
    state = CAEClassifier(ModelSpec(width=width, dense_units=8, input_norm="equalise")).encoder.state_dict()
    torch.save({"format": pretrain.ENCODER_FORMAT, "width": width, "input_norm": "equalise", "state_dict": state}, path)
    return state


def test_phase1_freezes_the_encoder_then_resume_trains_phase2(tiny_pack: Path, tmp_path: Path) -> None:
    encoder = _encoder_file(tmp_path / "encoder.pt")
    base = [
        "finetune",
        "--pack",
        str(tiny_pack),
        "--out",
        str(tmp_path / "ft"),
        "--encoder",
        str(tmp_path / "encoder.pt"),
        *TINY,
        "--phase1-batch-size",
        "8",
        "--phase2-batch-size",
        "8",
    ]
    args = cli.parse_args([*base, "--phase1-epochs", "1", "--phase2-epochs", "0"])
    rt = setup_runtime("cpu", progress=False)
    data = commands.load_data(args, rt)
    first = finetune.run_finetune(args, rt, data)
    assert [h["phase"] for h in first.history] == [1]
    for k, v in first.model.encoder.state_dict().items():
        assert torch.equal(v, encoder[k]), f"encoder weight {k} moved in phase 1"
    head_before = CAEClassifier(ModelSpec(width=4, dense_units=8)).head.state_dict()
    assert any(not torch.equal(v, head_before[k]) for k, v in first.model.head.state_dict().items())
    state = torch.load(tmp_path / "ft" / "finetune_state.pt", weights_only=True)
    assert {"model", "optimizer", "phase", "epoch", "args", "rng", "best_state"} <= set(state)
    assert state["args"]["phase1_epochs"] == 1 and state["optimizer"] is not None

    resumed = cli.parse_args([*base, "--phase1-epochs", "2", "--phase2-epochs", "1", "--resume"])
    second = finetune.run_finetune(resumed, rt, data)
    assert [(h["phase"], h["epoch"]) for h in second.history] == [(1, 1), (1, 2), (2, 1)]
    moved = [k for k, v in second.model.encoder.state_dict().items() if not torch.equal(v, encoder[k])]
    best_phase = [h["phase"] for h in second.history if h["best"]][-1]
    assert bool(moved) == (best_phase == 2)
    loaded = load_classifier(tmp_path / "ft" / "model.pt")
    assert loaded.card.provenance["best_val_loss"] == pytest.approx(second.best_val_loss)


def test_phase2_frozen_blocks_stay_bit_identical_and_a_resume_must_repeat_them(tiny_pack: Path, tmp_path: Path) -> None:
    encoder = _encoder_file(tmp_path / "encoder.pt")
    out, artefact = tmp_path / "ft", tmp_path / "classifier.pt"
    base = ["finetune", "--pack", str(tiny_pack), "--out", str(out), "--encoder", str(tmp_path / "encoder.pt"), *TINY,
            "--phase1-epochs", "0", "--phase2-batch-size", "8", "--export-classifier", str(artefact)]  # fmt: skip
    args = cli.parse_args([*base, "--phase2-epochs", "1", "--phase2-frozen-blocks", "1"])
    rt = setup_runtime("cpu", progress=False)
    data = commands.load_data(args, rt)
    result = finetune.run_finetune(args, rt, data)
    trained = result.model.encoder.state_dict()
    first_block = {"0.weight", "0.bias", "2.weight", "2.bias"}  # conv 3->w and conv w->w at 224x224
    assert {k for k in trained if torch.equal(trained[k], encoder[k])} == first_block
    state = torch.load(out / "finetune_state.pt", weights_only=True)
    assert state["phase2_frozen_blocks"] == 1 and state["args"]["phase2_frozen_blocks"] == 1
    assert [(h["phase"], h["frozen_blocks"]) for h in result.history] == [(2, 1)]
    assert load_classifier(out / "model.pt").card.provenance["phase2_frozen_blocks"] == 1
    stretch = load_classifier(artefact).card.provenance["accumulated"]["stretches"][0]
    assert [p.get("frozen_blocks") for p in stretch["phases"]] == [None, 1]

    for other in ("0", "2"):
        with pytest.raises(SystemExit, match="started with --phase2-frozen-blocks 1, not " + other):
            finetune.run_finetune(cli.parse_args([*base, "--phase2-epochs", "2", "--resume",
                                                  "--phase2-frozen-blocks", other]), rt, data)  # fmt: skip
    resumed = finetune.run_finetune(
        cli.parse_args([*base, "--phase2-epochs", "2", "--resume", "--phase2-frozen-blocks", "1"]), rt, data
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert all(torch.equal(resumed.model.encoder.state_dict()[k], encoder[k]) for k in first_block)


@pytest.mark.slow
def test_oneshot_end_to_end_then_evaluate_and_resume(tiny_pack: Path, tmp_path: Path) -> None:
    # One scenario read top to bottom, each step depending on the last: split, it would read worse.
    out = tmp_path / "run"
    argv = [
        "oneshot",
        "--pack",
        str(tiny_pack),
        "--out",
        str(out),
        "--budget-seconds",
        "600",
        *TINY,
        "--pretrain-epochs",
        "2",
        "--pretrain-batch-size",
        "8",
        "--phase1-epochs",
        "2",
        "--phase2-epochs",
        "1",
        "--phase1-batch-size",
        "8",
        "--phase2-batch-size",
        "8",
        "--ablation",
        "--heads",
        "lstm1_dense2,dense5",
    ]
    assert cli.main(argv) == 0
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == sorted(
        ["model.pt", "metrics.json", "report.md", "curves.png", "confusion.png", "roc.png", "train.log", "ablation.png"]
    )
    assert (out / "model.pt").stat().st_size < 16 * 1024 * 1024
    loaded = load_classifier(out / "model.pt")
    assert next(iter(loaded.model.state_dict().values())).dtype == torch.float32
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["state_dict"]["encoder.0.weight"].dtype == torch.float16
    prov = loaded.card.provenance
    for key in ("command", "config", "counts", "seed", "device", "wall_seconds", "images_per_second", "history"):
        assert key in prov, key
    assert {"pretrain", "finetune_phase1", "finetune_phase2", "evaluate"} <= set(prov["wall_seconds"])
    assert sum(prov["counts"]["test"].values()) >= 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]["per_class"]) == set(CLASS_NAMES)
    assert [r["head"] for r in metrics["ablation"]] == ["lstm1_dense2", "dense5"]
    assert "macro AUC" in (out / "report.md").read_text()
    assert "pretrain epoch 2/2" in (out / "train.log").read_text()
    # the runtime can load and run it
    prediction = Predictor(loaded, device="cpu").predict([torch.rand(3, 224, 224)])[0]
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-4)

    ev_out = tmp_path / "eval"
    assert (
        cli.main(
            ["evaluate", "--pack", str(tiny_pack), "--model", str(out / "model.pt"), "--out", str(ev_out), *TINY[4:]]
        )
        == 0
    )
    ev = json.loads((ev_out / "metrics.json").read_text())
    assert ev["metrics"]["accuracy"] == pytest.approx(metrics["metrics"]["accuracy"])
    assert {"confusion.png", "roc.png", "curves.png", "report.md"} <= {p.name for p in ev_out.iterdir()}

    # plots can be redrawn from metrics.json alone (for GPU hosts without matplotlib)
    for png in ("curves.png", "confusion.png", "roc.png", "ablation.png"):
        (out / png).unlink()
    assert cli.main(["report", "--run", str(out)]) == 0
    assert all((out / png).stat().st_size > 1000 for png in ("curves.png", "confusion.png", "roc.png", "ablation.png"))

    # resuming a finished run trains nothing more and rewrites the same results
    assert cli.main([*argv[:-3], "--no-ablation", "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert len(load_classifier(out / "model.pt").card.provenance["history"]) == len(prov["history"])
    assert again["metrics"]["accuracy"] == pytest.approx(metrics["metrics"]["accuracy"])


def test_oneshot_plans_epochs_to_fit_its_budget(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "budget"
    argv = [
        "oneshot",
        "--pack",
        str(tiny_pack),
        "--out",
        str(out),
        "--budget-seconds",
        "10",
        "--reserve-seconds",
        "2",
        *TINY,
        "--pretrain-epochs",
        "500",
        "--phase1-epochs",
        "500",
        "--phase2-epochs",
        "500",
        "--phase1-patience",
        "500",
        "--phase2-patience",
        "500",
        "--pretrain-batch-size",
        "16",
    ]
    assert cli.main(argv) == 0
    prov = load_classifier(out / "model.pt").card.provenance
    assert 1 <= prov["pretrain_epochs"] < 500
    assert len(prov["history"]) < 1000
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
    assert "stopped by the time budget" in (out / "report.md").read_text()


def _ddp_worker(rank: int, world_size: int, port: int, pack: str, out: str) -> None:
    """One torchrun-like rank running the one-shot command (replicas are checked to agree inside)."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    rc = cli.main(
        [
            "oneshot",
            "--pack",
            pack,
            "--out",
            out,
            "--budget-seconds",
            "600",
            *TINY,
            "--pretrain-epochs",
            "1",
            "--pretrain-batch-size",
            "4",
            "--phase1-epochs",
            "1",
            "--phase2-epochs",
            "1",
            "--phase1-batch-size",
            "4",
            "--phase2-batch-size",
            "4",
        ]
    )
    assert rc == 0


def test_ddp_two_gloo_processes(tiny_pack: Path, tmp_path: Path) -> None:
    ctx = mp.spawn(_ddp_worker, args=(2, free_port(), str(tiny_pack), str(tmp_path)), nprocs=2, join=False)
    give_up = time.monotonic() + 240
    while not ctx.join(timeout=2):
        if time.monotonic() > give_up:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP processes did not finish within 240 s")
    prov = load_classifier(tmp_path / "model.pt").card.provenance
    assert prov["world_size"] == 2
    n_train = sum(prov["counts"]["train"].values())
    per_rank = (n_train // 2) // 4 * 4  # each rank: its half in full batches of 4; counts are summed over ranks
    assert prov["history"][0]["images"] == 2 * per_rank
    assert prov["pretrain_history"][0]["images"] == 2 * per_rank
    assert (
        "world size 2" in (tmp_path / "train.log").read_text()
        or "2 process(es)" in (tmp_path / "train.log").read_text()
    )
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["images"] == sum(
        prov["counts"]["test"].values()
    )


def test_commands_chain_from_a_manifest(tiny_pack: Path, tmp_path: Path) -> None:
    manifest = tiny_pack.parent / "labels.csv"
    data = ["--manifest", str(manifest), "--root", str(SHARED), *TINY]
    assert cli.main(["pretrain", *data, "--out", str(tmp_path / "pre"), "--pretrain-epochs", "1"]) == 0
    encoder = tmp_path / "pre" / "encoder.pt"
    assert torch.load(encoder, weights_only=True)["format"] == pretrain.ENCODER_FORMAT
    tuning = ["--encoder", str(encoder), "--phase1-epochs", "1", "--phase2-epochs", "0", "--phase1-batch-size", "8"]
    assert cli.main(["finetune", *data, *tuning, "--out", str(tmp_path / "ft")]) == 0
    prov = load_classifier(tmp_path / "ft" / "model.pt").card.provenance
    assert prov["config"]["encoder"] == str(encoder) and prov["device"].startswith("cpu")
    assert cli.main(["ablation", *data, *tuning, "--heads", "lstm1_dense3", "--out", str(tmp_path / "ab")]) == 0
    rows = json.loads((tmp_path / "ab" / "ablation.json").read_text())["heads"]
    assert [r["head"] for r in rows] == ["lstm1_dense3"] and 0.0 <= rows[0]["accuracy"] <= 1.0
    assert "lstm1_dense3" in (tmp_path / "ab" / "report.md").read_text()
    assert (tmp_path / "ab" / "ablation.png").is_file()


def test_report_without_matplotlib_still_writes_markdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert not report.have_matplotlib()
    labels = torch.tensor([0, 1, 2, 1])
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    metrics = classification_metrics(labels, probs, CLASS_NAMES)
    written = report.write_report(tmp_path, title="t", metrics=metrics, labels=labels, probabilities=probs)
    assert [p.name for p in written] == ["report.md"]
    assert "| covid |" in (tmp_path / "report.md").read_text()


def test_gpu_style_path_bf16_channels_last_on_cpu(
    tiny_pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path's dtype and memory-format handling, exercised with CPU bf16 autocast and channels_last."""
    from training.engine import Runtime

    monkeypatch.setattr(Runtime, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    rt = Runtime(device=torch.device("cpu"), amp=True, channels_last=True, progress=False)
    args = cli.parse_args(
        ["oneshot", "--pack", str(tiny_pack), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
         "--budget-seconds", "300", *TINY,
         "--pretrain-epochs", "1", "--phase1-epochs", "1", "--phase2-epochs", "1", "--pretrain-batch-size", "8",
         "--phase1-batch-size", "8", "--phase2-batch-size", "8"]
    )  # fmt: skip
    summary = commands.run_oneshot(args, rt)
    assert all(math.isfinite(h["train_loss"]) for h in summary["finetune_history"])
    assert (tmp_path / "work" / "finetune" / "finetune_state.pt").is_file()
    assert not (tmp_path / "out" / "work").exists()
    assert math.isfinite(summary["pretrain_history"][0]["val_mse"])
    loaded = load_classifier(tmp_path / "out" / "model.pt")
    assert loaded.model.encoder[0].weight.is_contiguous()  # rebuilt contiguous whatever the training layout
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0


def test_sources_holds_each_source_out_of_training(tiny_pack: Path, tmp_path: Path) -> None:
    _encoder_file(tmp_path / "encoder.pt")
    out = tmp_path / "sources"
    argv = ["sources", "--pack", str(tiny_pack), "--encoder", str(tmp_path / "encoder.pt"), "--out", str(out), *TINY,
            "--phase1-epochs", "1", "--phase1-batch-size", "4", "--min-held-out", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    summary = json.loads((out / "sources.json").read_text())
    assert summary["rows"], summary
    names = {row["source"] for row in summary["rows"]}
    assert names <= set(summary["sources"]) and len(names) >= 2
    for row in summary["rows"]:
        counts = summary["sources"][row["source"]]
        assert row["images"] == sum(counts["val"].values()) + sum(counts["test"].values())
        for mode in ("left_out", "reference"):
            assert 0.0 <= row[mode]["accuracy"] <= 1.0 and row[mode]["images"] == row["images"]
    assert {row["balanced"] for row in summary["rows"]} == {False, True}
    assert "| held-out source |" in (out / "sources.md").read_text()
