"""What the machine does fast: bf16 autocast on a CPU only where it multiplies bfloat16 in hardware."""

from __future__ import annotations

from pathlib import Path

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


def cpu_precision() -> str:
    """Lightning's precision for training on this CPU: bf16-mixed where it has bf16 matrix instructions,
    32-true elsewhere."""
    return "bf16-mixed" if BF16_FLAGS & cpu_flags() else "32-true"
