"""Numeric precision of the classifier: bf16 autocast where the hardware computes in bf16, float32 elsewhere.

``[model] precision`` (and training's ``--amp``) is ``auto``, ``float32`` or ``bfloat16``. ``auto`` picks:

- CUDA: bfloat16 when the GPU supports it (``torch.cuda.is_bf16_supported()``), else float32;
- CPU: bfloat16 when the processor has bf16 arithmetic in hardware, else float32. Detection reads the ``flags``
  line of ``/proc/cpuinfo`` (Linux) and looks for ``amx_bf16`` (Intel AMX) or ``avx512_bf16`` (AVX512-BF16, Intel
  Cooper Lake and later, AMD Zen 4 and later). Without either, PyTorch emulates bf16 and it is slower than float32
  (measured on a 2-core AMD EPYC with AVX2 only, paper's classifier, batch 16: 9.1 images/s in float32 against
  1.0 in bf16), so ``auto`` never chooses it there. Other systems (no ``/proc/cpuinfo``) get float32.

Channels-last memory format is used on both devices: on that AVX2 CPU it made float32 inference 2.1x faster
(4.3 -> 9.1 images/s); oneDNN and cuDNN both prefer it for these convolutions.

The precision actually used is reported with every prediction, because bf16 and float32 probabilities of one
image differ slightly (within 0.01 for the shipped model, tested).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_triage import PRECISIONS

if TYPE_CHECKING:  # torch is imported where it is used: settings (and status) must not load it
    import torch

CPU_BF16_FLAGS: frozenset[str] = frozenset({"amx_bf16", "avx512_bf16"})
"""``/proc/cpuinfo`` flags that mean bf16 arithmetic in hardware."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The processor's feature flags from the first ``flags`` line of ``cpuinfo`` (empty when unreadable)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_has_bf16() -> bool:
    """True when this machine's CPU computes bf16 in hardware (AMX-BF16 or AVX512-BF16)."""
    return bool(cpu_flags() & CPU_BF16_FLAGS)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``float32`` or ``bfloat16`` for ``requested`` (one of PRECISIONS) on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu":
        return "bfloat16" if cpu_has_bf16() else "float32"
    return "float32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device`` for ``bfloat16``; nothing for ``float32``."""
    if precision == "bfloat16":
        import torch

        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
