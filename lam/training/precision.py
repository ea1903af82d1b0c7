"""What the machine does fast: bf16 autocast on a CPU only where it multiplies bfloat16 in hardware, and there
only for a model whose step it makes faster, as measured.

`LAM_CPU_PRECISION` (bf16-mixed or 32-true) makes the answer what the other kind of CPU would give: the tests run
the precision-sensitive part of the suite both ways on one machine (.ci/run).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lam.data.paths import measurements_dir
from lam.errors import UserError

log = logging.getLogger(__name__)

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


AUTO = "auto"  # trainer.precision=auto (conf/trainer/cpu.yaml): measured_precision decides
# what trainer.precision accepts: auto and Lightning's precisions (its short forms 16, 32, 64 and bf16 too)
PRECISIONS = (AUTO, "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "16", "32", "64", "bf16")
SPEEDUP = 1.1  # bf16-mixed only where its step is at least this much faster: a near tie keeps exact fp32


def pass_ms(net: nn.Module, tokens: torch.Tensor, precision: str) -> float:
    """The ms of one forward and backward pass of `net` over `tokens` at `precision`."""
    began = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = net(tokens)[0]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()
    return 1000 * (time.perf_counter() - began)


def pass_times(net: nn.Module, tokens: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """Each CPU precision's median ms a pass over `rounds` rounds, after an untimed one. The precisions take
    turns within a round, so that a drift in the machine's speed reaches both alike."""
    times: dict[str, list[float]] = {p: [] for p in CPU_PRECISIONS}
    for turn in range(rounds + 1):
        for precision in CPU_PRECISIONS:
            ms = pass_ms(net, tokens, precision)
            if turn:
                times[precision].append(ms)
    net.zero_grad(set_to_none=True)
    return {p: statistics.median(ms) for p, ms in times.items()}


def faster(times: dict[str, float]) -> str:
    """The precision to train at, given each one's ms a pass: bf16-mixed where it is SPEEDUP times faster."""
    return "bf16-mixed" if times["32-true"] >= SPEEDUP * times["bf16-mixed"] else "32-true"


def measurements_file() -> Path:
    return measurements_dir() / "precision.json"


def measurement_key(net: nn.Module, tokens: torch.Tensor) -> str:
    """What a measurement holds for: this CPU, torch and its thread count, the model's modules and sizes (its
    repr), and the batch's shape."""
    what = [platform.processor() or platform.machine(), sorted(cpu_flags() & BF16_FLAGS), torch.__version__,
            torch.get_num_threads(), repr(net), list(tokens.shape)]
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:16]


def measured_precision(net: nn.Module, batch_size: int, block_size: int, vocab_size: int) -> tuple[str, str]:
    """trainer.precision=auto on a CPU, one process: (the precision, why). 32-true where bf16 would be emulated
    (cpu_precision); else the faster of the two for a copy of this model on a batch of this shape, measured
    once per model and machine and kept in $LAM_CACHE_DIR/precision.json, so that the same config trains the
    same way on the same machine (delete the file to measure again)."""
    candidate = cpu_precision()
    if os.environ.get("LAM_CPU_PRECISION") or candidate == "32-true":
        return candidate, "LAM_CPU_PRECISION" if os.environ.get("LAM_CPU_PRECISION") else "no bf16 instructions"
    tokens = torch.randint(vocab_size, (batch_size, block_size), generator=torch.Generator().manual_seed(0))
    path, key = measurements_file(), measurement_key(net, tokens)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        log.info("trainer.precision=auto: timing bf16-mixed against 32-true on a copy of the model (once per model "
                 "and machine)")
        with torch.random.fork_rng():  # dropout draws here must not move the run's random stream
            trial = copy.deepcopy(net).train()
            known[key] = {p: round(ms, 3) for p, ms in pass_times(trial, tokens).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(known, indent=1))
        partial.replace(path)
    times = known[key]
    return faster(times), ", ".join(f"{p} {ms:.1f} ms a pass" for p, ms in times.items()) + f" (measured, {path})"
