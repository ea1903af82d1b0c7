"""What the machine does fast: bf16 autocast on a CPU only where it multiplies bfloat16 in hardware.

`LAM_CPU_PRECISION` (bf16-mixed or 32-true) makes the answer what the other kind of CPU would give: the tests run
the precision-sensitive part of the suite both ways on one machine (.ci/run).
"""

from __future__ import annotations

import os
from pathlib import Path

from lam.errors import UserError

# x86 instruction sets that multiply bfloat16 matrices natively (Intel Cooper Lake / Sapphire Rapids on,
# AMD Zen 4 on); without them bf16 is emulated: 17x slower per training step on an AVX2 CPU
# (benchmarks/RESULTS.md, Training speed)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as Linux lists them; empty where there is no /proc/cpuinfo (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


CPU_PRECISIONS = ("bf16-mixed", "32-true")  # what cpu_precision answers, and LAM_CPU_PRECISION may say


def cpu_precision() -> str:
    """Lightning's precision for training on this CPU: bf16-mixed where it has bf16 matrix instructions,
    32-true elsewhere; what $LAM_CPU_PRECISION says where it is set."""
    forced = os.environ.get("LAM_CPU_PRECISION")
    if forced:
        if forced not in CPU_PRECISIONS:
            raise UserError(f"LAM_CPU_PRECISION={forced} is not a CPU precision: use {' or '.join(CPU_PRECISIONS)}, "
                            "or unset it to let the CPU's flags decide")
        return forced
    return "bf16-mixed" if BF16_FLAGS & cpu_flags() else "32-true"


def emulated_bf16(precision: str, device_type: str) -> str | None:
    """Why `precision` will be slow on this device, or None: bfloat16 on an x86 CPU whose flags lack bf16 matrix
    instructions is emulated (12x slower a step than 32-true on a 2-core AVX2 EPYC, 17x on another). None where
    the flags are unknown (no /proc/cpuinfo, or not x86)."""
    flags = cpu_flags()
    if device_type != "cpu" or not str(precision).startswith("bf16") or not flags or BF16_FLAGS & flags:
        return None
    return (f"trainer.precision={precision} on a CPU without bf16 instructions (no {' or '.join(sorted(BF16_FLAGS))} "
            "in /proc/cpuinfo): bfloat16 is emulated, about 12-17x slower a step than trainer.precision=32-true")
