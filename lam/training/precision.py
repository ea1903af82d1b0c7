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
