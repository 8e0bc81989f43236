"""Training throughput on synthetic input: CAE and classifier training steps per second, on whatever device is here.

    python bench/train_throughput.py                          # paper model, CUDA if present
    python bench/train_throughput.py --compile --cae-batch 128
    python bench/train_throughput.py --device cpu --width 4 --steps 3 --cae-batch 4 --cls-batch 4   # quick CPU run

Prints images/s per configuration (bf16 autocast + channels_last on CUDA, fp32 on the CPU; the docs list
reference figures for an H200). Input goes through the same uint8 -> model-input path as training (augmentation on).
Phase 2 is timed once per ``--phase2-frozen-blocks`` value (default 0, 1 and 2: every layer trained, then the
first one or two convolution blocks frozen, as ``finetune --phase2-frozen-blocks`` does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# A GPU host runs this from a bare checkout (torch only, the package not installed): find it next to bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_triage.ml.model import HEADS, CAEClassifier, ConvAutoencoder, ModelSpec  # noqa: E402
from training.data import model_inputs  # noqa: E402
from training.engine import setup_runtime  # noqa: E402


def _time_steps(step, steps: int, warmup: int, sync) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - t0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--dense-units", type=int, default=64)
    p.add_argument("--head", default="lstm1_dense2", choices=HEADS)
    p.add_argument("--cae-batch", type=int, default=64)
    p.add_argument("--cls-batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--phase2-frozen-blocks", type=int, nargs="+", default=[0, 1, 2], help="phase 2 rows to time")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rt = setup_runtime(args.device, args.amp, args.channels_last, args.compile, progress=False)
    torch.manual_seed(0)
    pool = torch.randint(0, 256, (max(args.cae_batch, *args.cls_batch) * 2, 224, 224), dtype=torch.uint8)
    pool = pool.to(rt.device)

    def sync() -> None:
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    def batch(n: int) -> torch.Tensor:
        idx = torch.randint(0, pool.shape[0], (n,), device=rt.device)
        return rt.inputs(model_inputs(pool[idx], augment=True))

    print(
        f"device: {rt.device_name}; torch {torch.__version__}; amp={rt.amp} channels_last={rt.channels_last} "
        f"compile={rt.compile}; width {args.width}"
    )
    cae = rt.prepare(ConvAutoencoder(args.width))
    cae_net = rt.wrap(cae)
    fused = rt.device.type == "cuda"
    opt = torch.optim.Adam(cae.parameters(), lr=1e-3, fused=fused)

    def cae_step() -> None:
        x = batch(args.cae_batch)
        with rt.autocast():
            loss = F.mse_loss(cae_net(x).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    secs = _time_steps(cae_step, args.steps, args.warmup, sync)
    print(f"CAE training, batch {args.cae_batch}: {args.steps * args.cae_batch / secs:,.0f} images/s")
    phases = [("phase 1 (encoder frozen)", False, 0)] + [
        (f"phase 2 ({f'first {n} encoder block(s) frozen' if n else 'all layers'})", True, n)
        for n in args.phase2_frozen_blocks
    ]
    for phase, trainable, frozen in phases:
        for bs in args.cls_batch:
            model = rt.prepare(CAEClassifier(ModelSpec(args.head, args.width, dense_units=args.dense_units)))
            model.set_encoder_trainable(trainable, frozen)
            net = rt.wrap(model)
            copt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-3, fused=fused)
            y = torch.randint(0, 3, (bs,), device=rt.device)

            def cls_step(net=net, copt=copt, y=y, bs=bs) -> None:  # type: ignore[no-untyped-def]
                x = batch(bs)
                with rt.autocast():
                    loss = F.cross_entropy(net(x).float(), y)
                copt.zero_grad(set_to_none=True)
                loss.backward()
                copt.step()

            secs = _time_steps(cls_step, args.steps, args.warmup, sync)
            print(f"classifier {phase}, batch {bs}: {args.steps * bs / secs:,.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
