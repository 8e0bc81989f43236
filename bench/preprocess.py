"""Benchmark the pixel pipeline on one CPU core: milliseconds per 2048x2048 16-bit DX through ``prepare_path``.

Usage: ``python bench/preprocess.py [--runs N] [--size PIXELS]``. The inputs are generated in a temporary folder
(a smooth synthetic chest, 16 bits stored, rescale slope/intercept and a window, like a DX detector's output):
uncompressed Explicit VR Little Endian and JPEG 2000 lossless. Prints the median of N runs of the whole call
(CPU time and wall time) and of each step (read, decode, LUT, resize, CPU time). The steps are timed separately,
so they need not add up exactly, and the whole call reuses the cached LUT as a stream of images from one device
would.

Target (issue 2): <= 30 ms per uncompressed image on one core.
"""

from __future__ import annotations

import os

# One core: these must be set before numpy/torch are imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

from cxr_triage.ml import greylut, preprocess  # noqa: E402
from cxr_triage.ml.imaging import to_model_input  # noqa: E402
from cxr_triage.ml.preprocess import PreparedImage, check_header, prepare_path  # noqa: E402
from cxr_triage.testing import synthetic  # noqa: E402

torch.set_num_threads(1)


def median_ms(fn: Callable[[], Any], runs: int, clock: Callable[[], float] = time.process_time) -> float:
    """Median milliseconds of ``fn`` by ``clock``: CPU time by default, so that other processes competing for the
    cores do not inflate the figure (the work is single-threaded); pass ``time.perf_counter`` for wall time."""
    fn()  # warm-up: imports, plugin discovery, page cache
    times = []
    for _ in range(runs):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000.0 * statistics.median(times)


def bench_file(label: str, path: Path, runs: int) -> None:
    """Median of the whole ``prepare_path`` call, then of each step on its own (fresh data sets, no caches)."""
    result = prepare_path(path)
    if not isinstance(result, PreparedImage):
        raise SystemExit(f"{label}: refused: {result}")
    total = median_ms(lambda: prepare_path(path), runs)
    wall = median_ms(lambda: prepare_path(path), runs, time.perf_counter)
    read = median_ms(lambda: pydicom.dcmread(path), runs)

    datasets = iter([pydicom.dcmread(path) for _ in range(runs + 1)])
    header = pydicom.dcmread(path)
    if check_header(header)[0] is not None:
        raise SystemExit(f"{label}: header refused")
    table, code_dtype = greylut.build_grey_lut(header)
    decode = median_ms(lambda: preprocess.container_codes(next(datasets), code_dtype), runs)
    codes = preprocess.container_codes(header, code_dtype)
    lut = median_ms(lambda: greylut.apply_table(greylut.build_grey_lut(header)[0], codes), runs)
    unit = greylut.apply_table(table, codes)
    resize = median_ms(lambda: to_model_input(unit), runs)
    print(
        f"{label:<30} total {total:6.1f} ms (wall {wall:6.1f}) | read {read:5.1f} | decode {decode:6.1f} "
        f"| LUT {lut:5.1f} | resize {resize:5.1f}   ({path.stat().st_size / 1e6:.1f} MB file)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per figure (median reported)")
    parser.add_argument("--size", type=int, default=2048, help="rows and columns of the test image")
    args = parser.parse_args(argv)
    print(
        f"pixel pipeline, {args.size}x{args.size} 16-bit DX, median of {args.runs} runs, one thread "
        f"(torch {torch.__version__}, pydicom {pydicom.__version__}, numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible)"
    )
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        ds = synthetic.rescaled_dx(args.size)
        native = Path(tmp) / "dx_native.dcm"
        ds.save_as(native, enforce_file_format=True)
        ds.compress(JPEG2000Lossless)
        j2k = Path(tmp) / "dx_j2k_lossless.dcm"
        ds.save_as(j2k, enforce_file_format=True)
        bench_file("uncompressed (Explicit VR LE)", native, args.runs)
        bench_file("JPEG 2000 lossless", j2k, max(3, args.runs // 3))
    print("(CPU time per image, median; wall = elapsed time, inflated when other processes share the cores)")
    print("(steps timed alone: read = dcmread; decode = pixel data to codes; LUT = modality/VOI/MONOCHROME table")
    print(" built without cache and applied; resize = antialiased 224x224 + 3 channels; total uses the table cache)")


if __name__ == "__main__":
    main()
