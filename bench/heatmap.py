"""CPU cost per image of the worker's model work with and without the Grad-CAM heatmap (issue 31: budget +25 %).

    python bench/heatmap.py                     # the shared radiographs, the bundled model, 2 threads, 3 runs
    python bench/heatmap.py --threads 4 --runs 5 --batch 16

Per image, on the CPU, in process CPU seconds (``time.process_time``, all threads) and wall seconds: ``prepare``
(read, decode, VOI, squash to 224x224: ``prepare_path``), ``predict`` (``Predictor.probabilities``, the worker's
batch call), ``heatmap`` (``GradCAMHeatmap.build`` at each image's own rows and columns, a second pass in float32).
"without" is prepare + predict, "with" adds the heatmap; "one pass for both" is prepare + heatmap (the heatmap pass
yields the logits too, in float32, so a worker could classify from it). The best of ``--runs`` runs is kept. Prints
the machine (CPU model, threads) and the load average, since other processes (a training run) may share the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_triage import BUNDLED_MODEL  # noqa: E402
from cxr_triage.ml.checkpoint import load_classifier  # noqa: E402
from cxr_triage.ml.heatmap import GradCAMHeatmap  # noqa: E402
from cxr_triage.ml.inference import Predictor  # noqa: E402
from cxr_triage.ml.preprocess import PreparedImage, prepare_path  # noqa: E402

SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best(runs: int, step: Callable[[], object]) -> tuple[float, float]:
    """The smallest (CPU seconds, wall seconds) of ``runs`` calls of ``step``."""
    cpu, wall = float("inf"), float("inf")
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu, wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", type=Path, default=SHARED_DICOM, help="DICOM files to use (default: shared)")
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pydicom

    files = sorted(args.folder.glob("*.dcm"))
    if not files:
        p.error(f"no .dcm files in {args.folder}")
    sizes = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        sizes.append((int(ds.Rows), int(ds.Columns)))
    prepared = [prepare_path(f) for f in files]
    tensors = torch.stack([im.tensor for im in prepared if isinstance(im, PreparedImage)])
    loaded = load_classifier(args.model)
    predictor = Predictor(loaded, device="cpu", batch_size=args.batch, precision="float32")
    heatmap = GradCAMHeatmap(loaded.model, device="cpu")
    n = len(files)
    prep = best(args.runs, lambda: [prepare_path(f) for f in files])
    pred = best(args.runs, lambda: predictor.probabilities(tensors))
    heat = best(args.runs, lambda: heatmap.build(tensors, sizes))
    without = (prep[0] + pred[0]) / n
    with_map = without + heat[0] / n
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {args.threads}, torch {torch.__version__}")
    print(f"load average (1, 5, 15 min) after the runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"images: {n} from {args.folder} ({', '.join(f'{r}x{c}' for r, c in sizes)}), model {args.model.name}")
    for name, (cpu, wall) in (("prepare", prep), ("predict", pred), ("heatmap", heat)):
        print(f"{name:8s} CPU {cpu / n * 1000:8.1f} ms/image   wall {wall / n * 1000:8.1f} ms/image")
    print(f"without heatmap: CPU {without * 1000:.1f} ms/image")
    extra = (with_map / without - 1) * 100
    print(f"with heatmap:    CPU {with_map * 1000:.1f} ms/image (+{extra:.1f} %, budget +25 %)")
    # The heatmap pass computes the logits too: a worker could take its prediction from it instead of a second pass.
    fused = (prep[0] + heat[0]) / n
    print(
        f"one pass for both (prepare + heatmap): CPU {fused * 1000:.1f} ms/image (+{(fused / without - 1) * 100:.1f} %)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
