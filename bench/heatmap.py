"""CPU cost per image of the worker's model work with and without the Grad-CAM heatmap (issue 31: budget +25 %).

    python bench/heatmap.py                     # the shared radiographs, the bundled model, 2 threads, 3 runs
    python bench/heatmap.py --threads 4 --runs 5 --batch 16 --precision float32

Per image, on the CPU, in process CPU seconds (``time.process_time``, all threads) and wall seconds, the worker's
own calls:

- ``prepare``: read, decode, VOI, squash to 224x224 (``read_dicom`` + ``prepare_dataset``); ``prepare + display``
  keeps the decoded radiograph too (``keep_display``, what the worker does when it files heatmap objects);
- ``predict``: the worker without a heatmap (``pipeline.predict_with_maps`` without one: ``Predictor.predict`` in
  ``--precision``, ``auto`` as the worker's default);
- ``one pass``: the worker with the heatmap (``pipeline.predict_with_maps`` with a ``GradCAMHeatmap``: prediction
  and coarse map from one float32 pass);
- ``separate pass``: the map as a second pass beside the prediction (``GradCAMHeatmap.coarse``), for comparison;
- ``heatmap object``: the recorder's Secondary Capture (``HeatmapSecondaryCapture.build`` at the radiograph's own
  geometry, and its encoding).

"without heatmap" is prepare + predict; "with heatmap" prepare + one pass (the map the worker stores), and then
+ display + the heatmap object (what filing it in the PACS adds). The best of ``--runs`` runs is kept. Prints the
machine (CPU model from /proc/cpuinfo, threads) and the load average, since other processes (a training run) may
share the CPU: figures taken beside one are noisy.
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
from cxr_triage.ml.preprocess import PreparedImage, Refusal, prepare_dataset, read_dicom  # noqa: E402
from cxr_triage.outputs.heatmapobject import HeatmapSecondaryCapture  # noqa: E402
from cxr_triage.outputs.sr import sr_to_bytes  # noqa: E402
from cxr_triage.triage.pipeline import predict_with_maps  # noqa: E402

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
    # Over 60 lines: one measurement per step of the worker, printed in the order the docstring lists them.
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", type=Path, default=SHARED_DICOM, help="DICOM files to use (default: shared)")
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="auto", help="the predictor's precision without a heatmap (default auto)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = sorted(args.folder.glob("*.dcm"))
    if not files:
        p.error(f"no .dcm files in {args.folder}")

    def prepare(keep: bool) -> list[PreparedImage]:
        found = []
        for f in files:
            ds = read_dicom(f)
            image = prepare_dataset(ds, keep_display=keep) if not isinstance(ds, Refusal) else ds
            if isinstance(image, PreparedImage):
                found.append(image)
        return found

    prepared = prepare(True)
    tensors = [im.tensor for im in prepared]
    headers = [read_dicom(f) for f in files]
    headers = [h for h in headers if not isinstance(h, Refusal)]
    loaded = load_classifier(args.model)
    predictor = Predictor(loaded, device="cpu", batch_size=args.batch, precision=args.precision)
    heatmap = GradCAMHeatmap(loaded.model, device="cpu")
    maps = predict_with_maps(tensors, predictor, heatmap)[1]
    sc = HeatmapSecondaryCapture()
    n = len(prepared)

    def objects() -> None:
        for header, image, coarse in zip(headers, prepared, maps, strict=True):
            assert image.display is not None
            sr_to_bytes(sc.build(header, image.display, coarse, model_version=loaded.card.model_version))

    steps = {
        "prepare": best(args.runs, lambda: prepare(False)),
        "prepare + display": best(args.runs, lambda: prepare(True)),
        "predict": best(args.runs, lambda: predict_with_maps(tensors, predictor, None)),
        "one pass": best(args.runs, lambda: predict_with_maps(tensors, predictor, heatmap)),
        "separate pass": best(args.runs, lambda: heatmap.coarse(torch.stack(tensors))),
        "heatmap object": best(args.runs, objects),
    }
    cpu = {name: value[0] / n * 1000 for name, value in steps.items()}
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {args.threads}, torch {torch.__version__}")
    print(f"load average (1, 5, 15 min) after the runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    sizes = ", ".join(f"{im.display.shape[0]}x{im.display.shape[1]}" for im in prepared if im.display is not None)
    print(f"images: {n} from {args.folder} ({sizes}), model {args.model.name}, predictor {predictor.precision}")
    for name, (step_cpu, wall) in steps.items():
        print(f"{name:17s} CPU {step_cpu / n * 1000:8.1f} ms/image   wall {wall / n * 1000:8.1f} ms/image")
    without = cpu["prepare"] + cpu["predict"]
    with_map = cpu["prepare"] + cpu["one pass"]
    separate = without + cpu["separate pass"]
    filed = cpu["prepare + display"] + cpu["one pass"] + cpu["heatmap object"]
    print(f"without heatmap: CPU {without:.1f} ms/image")
    print(f"with heatmap:    CPU {with_map:.1f} ms/image (+{(with_map / without - 1) * 100:.1f} %, budget +25 %)")
    print(f"one pass for both (the worker): as 'with heatmap'; a separate pass instead: CPU {separate:.1f} ms/image "
          f"(+{(separate / without - 1) * 100:.1f} %)")  # fmt: skip
    print(f"with heatmap and its PACS object: CPU {filed:.1f} ms/image (+{(filed / without - 1) * 100:.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
