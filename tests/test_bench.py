"""The benchmark scripts still run and print their figures (tiny sizes; no figure is checked against a target:
timings belong to the scripts' own output, not to tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_listener_bench_reports_every_figure() -> None:
    out = run_bench(
        "listener.py", "--images", "3", "--size", "256", "--studies", "2", "--senders", "2", "--single", "1"
    )
    for start in (
        "machine: ",
        "ingest: 3 instances acknowledged",
        "pipeline: 3 results (states ['done'])",
        "latency acknowledgement -> committed result: p50 ",
        "latency of one image sent alone to the idle server (1 in turn): p50 ",
        "model alone, before the server",
        "model alone, after the server",
        "CPU time per image",
        "the same work alone, CPU per image: pynetdicom receiving with a no-op handler ",
        "overhead of the pipeline over the model alone: ",
    ):
        assert any(line.startswith(start) for line in out.splitlines()), f"no line starting {start!r} in:\n{out}"


@pytest.mark.slow
def test_peers_bench_reports_every_receiver_stage_and_target(tmp_path: Path) -> None:
    from cxr_triage.testing.peers import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "tiny.pt")
    out = run_bench(
        "peers.py",
        *("--images", "4", "--size", "128", "--studies", "2", "--senders", "2", "--single", "1"),
        *("--model", str(model), "--workers", "1", "--device", "cpu"),
    )
    lines = out.splitlines()
    rows = {line.split(" | ")[0].strip(): line.split(" | ")[1:] for line in lines if " | " in line}
    whole = [name for name in rows if name.startswith("cxr-triage serve, 1 worker(s)")]
    assert len(whole) == 1 and whole[0].endswith(", until every result and SR is committed"), out
    receivers = [
        "dcmtk storescp --fork (store only)",
        "Orthanc (store + index)",
        "cxr-triage serve, workers off (ingest only)",
        *whole,
    ]
    for name in receivers:
        rate, cpu, share, recorded = rows[name]
        # CPU comes from /proc in clock ticks (10 ms): 4 small images may all fit in one tick, printed as 0 ms.
        assert float(rate) > 0 and float(cpu) >= 0 and share.endswith("%"), rows[name]
        assert recorded == "4/4", (name, out)
    assert rows["Orthanc (store + index)"][2].strip() == "100 %"
    stages = ["receive", "C-STORE handler (parse, sha256)", "spool write", "database insert (listener)"]
    stages += ["queue claim", "preprocessing", "model", "SR build", "SR write", "thumbnail write", "database commit"]
    stages += ["recorder, rest of record()", "forward", "total"]
    for stage in stages:
        assert float(rows[stage][0]) >= 0, (stage, rows[stage])
    assert "4 of 4 SRs forwarded" in out
    for start in (
        "machine: ",
        "lone image on the idle server, acknowledgement -> committed result (1 in turn): p50 ",
        "  ingest-only CPU per image <= Orthanc's: ",
        "  whole pipeline >= 15 instances/s: ",
        "  whole pipeline >= 45 % of Orthanc's rate ",
        "  lone image, acknowledgement -> committed result p95 <= 250 ms: ",
        "load average at the end: ",
    ):
        assert any(line.startswith(start) for line in lines), f"no line starting {start!r} in:\n{out}"


def test_preprocess_bench_reports_both_encodings() -> None:
    out = run_bench("preprocess.py", "--runs", "1", "--size", "256")
    assert "ms" in out
    assert "JPEG 2000" in out or "JPEG2000" in out or "J2K" in out, out


def test_training_throughput_bench_runs_on_the_cpu() -> None:
    out = run_bench(
        "train_throughput.py",
        *("--device", "cpu", "--width", "4", "--dense-units", "8", "--steps", "1", "--warmup", "0"),
        *("--cae-batch", "2", "--cls-batch", "2"),
    )
    assert "CAE training, batch 2:" in out
    assert out.count("classifier phase") == 4  # phase 1, then phase 2 with 0, 1 and 2 encoder blocks frozen
    assert "classifier phase 2 (first 1 encoder block(s) frozen), batch 2:" in out


def test_inference_bench_reports_every_configuration() -> None:
    out = run_bench(
        "inference.py",
        *("--width", "4", "--batch", "2", "--seconds", "0.1", "--warmup", "1"),
        "--configs",
        "fp32,bf16-cl",
    )
    assert out.startswith("machine: ") and "GFLOP per image" in out
    assert "fp32: " in out and "bf16-cl: " in out and out.count("TFLOP/s achieved") == 2


def test_gpu_session_script_runs_every_step_even_after_a_failure(tmp_path: Path) -> None:
    script = REPO / "bench" / "gpu_session.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    out = tmp_path / "out"
    # No pack: training fails, the benchmarks still run (on a random tiny model) and the script says so.
    done = subprocess.run(
        ["bash", str(script), str(tmp_path / "missing.pack"), str(out), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    log = (out / "session.log").read_text()
    assert done.returncode == 1, log[-3000:]
    assert "=== train: FAILED" in log
    assert "=== inference: done" in log and "fp32-cl: " in log
    assert "=== train-throughput: done" in log and "CAE training, batch 4:" in log
    assert not (out / "model.pt").exists()
