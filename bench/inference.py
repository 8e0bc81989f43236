"""Classifier inference throughput: images/s and achieved TFLOP/s per precision and memory format.

    python bench/inference.py                                   # the bundled model, batch 16, CPU configurations
    python bench/inference.py --device cuda --batch 256 --width 64 --configs fp32,bf16-cl,bf16-cl-compile
    python bench/inference.py --model run/model.pt --threads 2

Configurations: ``fp32`` (float32, contiguous), ``fp32-cl`` (float32, channels_last), ``bf16-cl`` (bf16 autocast,
channels_last: what ``[model] precision = "auto"`` runs where the hardware has bf16), ``bf16-cl-compile`` (the
same under ``torch.compile``). Input is random (3, 224, 224) batches already on the device: this measures the
model alone, not decoding. FLOPs per image are counted once with ``torch.utils.flop_counter`` (multiply-add = 2).
Prints one line per configuration and a line naming the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

# A GPU host runs this from a bare checkout (torch only, the package not installed): find it next to bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_triage import BUNDLED_MODEL  # noqa: E402
from cxr_triage.ml.model import CAEClassifier, ModelSpec  # noqa: E402
from cxr_triage.ml.precision import cpu_has_bf16  # noqa: E402

CONFIGS = ("fp32", "fp32-cl", "bf16-cl", "bf16-cl-compile")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the bundled model, else --width)")
    p.add_argument("--width", type=int, default=None, help="random model of this width instead of a checkpoint")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per configuration (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward passes first (compile: more)")
    p.add_argument("--configs", default="fp32,fp32-cl,bf16-cl", help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's choice)")
    return p


def load_model(args: argparse.Namespace) -> tuple[CAEClassifier, str]:
    if args.width is not None:
        torch.manual_seed(0)
        return CAEClassifier(ModelSpec(width=args.width)), f"random weights, width {args.width}"
    from cxr_triage.ml.checkpoint import load_classifier

    path = args.model or BUNDLED_MODEL
    loaded = load_classifier(path)
    return loaded.model, f"{loaded.card.model_version} (width {loaded.card.spec.width}, {path})"


def flops_per_image(model: torch.nn.Module, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.rand(1, 3, 224, 224, device=device))
    return float(counter.get_total_flops())


def measure(
    model: torch.nn.Module, config: str, device: torch.device, batch: int, seconds: float, warmup: int
) -> float:
    """Images per second of ``model`` in ``config``."""
    channels_last = "-cl" in config
    net = model.to(device).eval()
    net = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if config.endswith("compile"):
        net = torch.compile(net)
        warmup = max(warmup, 5)
    x = torch.rand(batch, 3, 224, 224, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if config.startswith("bf16") else contextlib.nullcontext()

    def step() -> None:
        with torch.inference_mode(), cast:
            net(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        step()
        done += batch
    return done / (time.perf_counter() - t0)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, bf16 in hardware: "
        f"{'yes' if cpu_has_bf16() else 'no'}, PyTorch {torch.__version__}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, what = load_model(args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; expected some of {', '.join(CONFIGS)}")
    flops = flops_per_image(model.to(device).eval(), device)
    print(f"machine: {machine(device)}")
    print(f"model: {what}; {flops / 1e9:.2f} GFLOP per image; batch {args.batch}")
    for config in configs:
        ips = measure(model, config, device, args.batch, args.seconds, args.warmup)
        print(f"{config:>16}: {ips:,.1f} images/s, {ips * flops / 1e12:.3f} TFLOP/s achieved", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
