"""Which way of computing trains fastest on this CPU: precision, memory format, torch.compile, batch, threads.

Times training steps of the three workloads the recipe runs (the autoencoder, phase 1 on cached features is not
a convolution workload and is left out, phase 2 with every layer trained) on synthetic input at the given side,
one configuration after another, and prints images/s, the achieved TFLOP/s (floating-point operations of one
step counted by ``torch.utils.flop_counter`` on the model itself) and that figure as a share of the processor's
peak. bf16 autocast is tried only where the processor computes bf16 in hardware (AMX-BF16 or AVX512-BF16 in
/proc/cpuinfo): elsewhere it is emulated and slower than float32, which would only waste the bench's time.

By default it varies one factor at a time around a base (bf16 where the hardware has it, channels_last, no
compile, batch 32, every core), which is enough to choose; ``--grid`` runs every combination::

    python bench/train_compute.py                                 # the paper's width, 224x224, ~15 minutes
    python bench/train_compute.py --workloads cae --size 128      # the autoencoder at a lower side
    python bench/train_compute.py --width 4 --seconds 1 --batches 4 --threads 1   # quick check of the script

Peak: cores x clock (``cpu MHz`` of /proc/cpuinfo, which a virtual machine may report as the nominal clock) x
floating-point operations per cycle and core: float32 32 (two 256-bit FMA pipes: AVX2 machines and AMD's
AVX-512, which runs on them) or 64 (Intel AVX-512 with two FMA units); bf16 twice the float32 figure with
AVX512-BF16, 1,024 with AMX-BF16. Stop any training first: the figures are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_triage.ml.model import CAEClassifier, ConvAutoencoder, ModelSpec  # noqa: E402
from cxr_triage.ml.precision import cpu_has_bf16  # noqa: E402

WORKLOADS = ("cae", "phase2")


@dataclass(frozen=True)
class Config:
    precision: str  # "float32" or "bfloat16"
    channels_last: bool
    compile: bool
    batch: int
    threads: int

    def label(self) -> str:
        fmt = "channels_last" if self.channels_last else "contiguous"
        mode = "compile" if self.compile else "eager"
        return f"{self.precision:<8} {fmt:<13} {mode:<7} {self.batch:>5} {self.threads:>7}"


def cpu_flags() -> tuple[str, str, float]:
    """(vendor, flags, MHz) from /proc/cpuinfo."""
    vendor, flags, mhz = "unknown", "", 0.0
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "vendor_id":
                vendor = value.strip()
            elif key == "flags" and not flags:
                flags = value
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
    return vendor, flags, mhz


def peak_tflops(precision: str, cores: int) -> float:
    """The processor's peak for ``precision`` on ``cores`` cores (module docstring), in TFLOP/s."""
    vendor, flags, mhz = cpu_flags()
    words = set(flags.split())
    fp32 = 64 if ("avx512f" in words and vendor == "GenuineIntel") else 32
    per_cycle = fp32
    if precision == "bfloat16":
        per_cycle = 1024 if "amx_bf16" in words else 2 * fp32
    return cores * mhz * 1e6 * per_cycle / 1e12


def _model(
    workload: str, width: int
) -> tuple[torch.nn.Module, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]]:
    if workload == "cae":
        return ConvAutoencoder(width, "equalise"), lambda net, x: F.mse_loss(net(x).float(), x)
    model = CAEClassifier(ModelSpec(width=width, input_norm="equalise"))
    y = torch.zeros(1, dtype=torch.long)
    return model, lambda net, x: F.cross_entropy(net(x).float(), y.expand(x.shape[0]))


def flops_per_image(workload: str, width: int, size: int) -> float:
    """Floating-point operations of one training step (forward + backward) per image, float32 eager."""
    model, loss_of = _model(workload, width)
    x = torch.rand(2, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(model, x).backward()
    return counter.get_total_flops() / 2


def images_per_second(workload: str, width: int, size: int, cfg: Config, seconds: float) -> float:
    """Training steps of ``cfg`` for about ``seconds`` after a warm-up step (two for torch.compile)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model, loss_of = _model(workload, width)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if cfg.compile else model
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.rand(cfg.batch, 3, size, size).contiguous(memory_format=fmt)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"):
            loss = loss_of(net, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2 if cfg.compile else 1):
        step()
    steps, t0 = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return steps * cfg.batch / (time.perf_counter() - t0)


def configs(args: argparse.Namespace, bf16: bool) -> list[Config]:
    precisions = ["float32", "bfloat16"] if bf16 else ["float32"]
    cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, cores})
    if args.grid:
        combos = itertools.product(precisions, (True, False), (False, True), args.batches, threads)
        return [Config(*c) for c in combos]
    base = Config(precisions[-1], True, False, 32 if 32 in args.batches else args.batches[0], max(threads))
    out = [base]
    for cfg in (
        *(replace(base, precision=p) for p in precisions),
        replace(base, channels_last=False),
        *((replace(base, compile=True),) if args.compile else ()),
        *(replace(base, batch=b) for b in args.batches),
        *(replace(base, threads=t) for t in threads),
    ):
        if cfg not in out:
            out.append(cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--width", type=int, default=64, help="filters of the first convolution (paper 64)")
    p.add_argument("--size", type=int, default=224, help="the autoencoder's side (a multiple of 32); phase 2 is 224")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64], help="batch sizes tried")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts tried (default 1 and all)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per configuration (at least 2 steps)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also try torch.compile")
    p.add_argument("--grid", action="store_true", help="every combination instead of one factor at a time")
    args = p.parse_args(argv)
    vendor, flags, mhz = cpu_flags()
    bf16 = cpu_has_bf16()
    hw = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
    print(
        f"CPU: {vendor}, {os.cpu_count()} cores at {mhz:.0f} MHz, {' '.join(hw)}; torch {torch.__version__}; "
        f"bf16 {'in hardware: tried' if bf16 else 'not in hardware: not tried'}; width {args.width}, side {args.size}"
    )
    for workload in args.workloads:
        size = args.size if workload == "cae" else 224  # the classifier's head expects 7x7 = 49 steps
        flops = flops_per_image(workload, args.width, size)
        print(f"\n{workload} at {size}x{size}: {flops / 1e9:.2f} GFLOP per image per training step")
        print(f"{'precision':<8} {'memory format':<13} {'mode':<7} {'batch':>5} {'threads':>7} {'images/s':>9} "
              f"{'TFLOP/s':>8} {'of peak':>8}")  # fmt: skip
        best: tuple[float, Config] | None = None
        for cfg in configs(args, bf16):
            ips = images_per_second(workload, args.width, size, cfg, args.seconds)
            achieved = ips * flops / 1e12
            share = achieved / peak_tflops(cfg.precision, cfg.threads)
            print(f"{cfg.label()} {ips:>9.2f} {achieved:>8.3f} {share:>8.1%}", flush=True)
            if best is None or ips > best[0]:
                best = (ips, cfg)
        assert best is not None
        print(f"fastest for {workload}: {' '.join(best[1].label().split())} at {best[0]:.2f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
