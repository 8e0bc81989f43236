"""bench/load.py still runs and prints its figures, at a small size (4 associations x 5 instances, one short soak
round); the full 16 x 50 and the 10-minute soak are run by hand (docs/RELIABILITY.md, Load). Timings are the
script's output, never checked here: only that every instance sent ended with a result, read from the database."""

from __future__ import annotations

import re

from test_bench import run_bench


def test_load_bench_reports_results_throughput_latency_and_rss() -> None:
    out = run_bench(
        "load.py",
        *("--senders", "4", "--per-sender", "5", "--size", "96", "--workers", "1"),
        *("--soak-minutes", "0.02", "--rss-interval", "1"),
        timeout=600,
    )
    lines = out.splitlines()
    syntaxes = next(line for line in lines if line.startswith("syntaxes received: "))
    for name in ("Explicit VR LE", "Implicit VR LE", "JPEG Lossless SV1", "RLE Lossless", "JPEG 2000 Lossless"):
        assert f"'{name}': 4" in syntaxes, syntaxes
    assert "round 1: 20 of 20 instances ended with a result ({'done': 20}, never received: 0)" in out, out
    assert re.search(r"round 1: throughput [0-9.]+ instances/s .* p95 [0-9.]+ s", out), out
    assert any(line.startswith("round 2: 20 of 20 instances ended with a result") for line in lines), out
    assert re.search(r"soak: \d+ rounds in [0-9.]+ min, (\d+) of \1 instances ended with a result", out), out
    assert re.search(r"RSS of serve's process tree \(\d+ processes\): \d+ MiB at the start .* \d+ MiB at the end", out)
    assert lines[-1] == "instances sent without a result: 0"
