"""Attention mechanisms side by side: training step time and peak memory of one layer, generation time per token.

    python -m benchmarks.attention                        # 256 .. 8192 tokens, every mechanism (< 10 min, 2 CPU cores)
    python -m benchmarks.attention --quick                # 256, 1024 tokens (< 1 min)
    python -m benchmarks.attention --mechanisms softmax linear linear:chunk_size=128 --lengths 4096 --core
    python -m benchmarks.attention --mechanisms softmax linear retention gated --recompute --lengths 4096

A mechanism is a conf/attention/<name>.yaml, optionally with overrides after a colon (`linear:chunk_size=32`);
`softmax@math` forces SDPA's math kernel, textbook attention with the (T, T) scores in memory, for reference.
`--recompute` adds, after each mechanism whose config has a `recompute` key, its row with `recompute=true` (the chunked
mechanisms recomputed in backward; not the "recompute" of generation below).
What is measured, per mechanism and length T (batch B, d_model, n_head):
- train ms: forward + backward of one attention layer (q/k/v and output projections included; `--core` times the
  mechanism's `mix` alone) on a (B, T, d_model) input; the median of `--repeats` runs after one warm-up, the
  mechanisms interleaved within each repeat so that a busy machine slows them alike.
- peak MiB: on CPU, the peak of bytes held by torch's CPU allocator during one forward + backward, above what was
  held before it (torch.profiler memory events: every tensor the step allocates, activations saved for backward
  included; not MKL/oneDNN scratch nor the Python heap). On CUDA, torch.cuda.max_memory_allocated above the
  memory allocated before the step.
- decode ms/token: one new token through the layer with the state of a T-token context (KV cache, trimmed cache,
  recurrent state): `--decode-steps` steps in rounds of 8 consecutive ones, the rounds round-robin over the
  lengths of one mechanism; the mean step time of the fastest round (the one no other job preempted).
  For softmax also `recompute`: one forward over the whole T+1-token context without a state (fastest of 3),
  what generation costs per token without a cache.
- on CPU, one thread unless `--threads` says otherwise: on a machine shared with other jobs, two threads make
  every small op wait until the second thread is scheduled, and the timings swing by 10× from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

CONF = Path(__file__).resolve().parents[1] / "conf" / "attention"
MECHANISMS = ["softmax", "window", "linear", "retention", "gated"]
LENGTHS = [256, 512, 1024, 2048, 4096, 8192]
QUICK_LENGTHS = [256, 1024]


def build(spec: str, d_model: int, n_head: int, device: str) -> torch.nn.Module:
    """`name` or `name:key=value,key=value` -> the attention layer conf/attention/name.yaml builds."""
    name, _, overrides = spec.split("@")[0].partition(":")
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for item in filter(None, overrides.split(",")):
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    return instantiate(cfg)(d_model=d_model, n_head=n_head, dropout=0.0, bias=False, rope=False).to(device)


def with_recompute(spec: str) -> list[str]:
    """[spec, spec with recompute=true] for a mechanism whose config has `recompute`, else [spec]."""
    name, _, overrides = spec.split("@")[0].partition(":")
    if "recompute" not in OmegaConf.load(CONF / f"{name}.yaml"):
        return [spec]
    return [spec, f"{spec},recompute=true" if overrides else f"{spec}:recompute=true"]


def sdpa_backend(spec: str):
    """`softmax@math` runs scaled_dot_product_attention through its reference (math) kernel, which materialises
    the (T, T) scores as textbook attention does; any other spec keeps torch's choice (flash attention on CPU)."""
    if spec.endswith("@math"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(layer, x: torch.Tensor, core: bool):
    """A closure running forward + backward of the layer (or of its `mix` alone) on x."""
    if not core:
        def step():
            y, _ = layer(x)
            y.sum().backward()
        return step
    with torch.no_grad():
        q, k, v = layer.project(x)
        extra = {"gates": layer.gates(x)} if hasattr(layer, "gate") else {}
    leaves = [t.contiguous().requires_grad_() for t in (q, k, v, *extra.values())]

    def step():
        y, _ = layer.mix(*leaves[:3], None, **dict(zip(extra, leaves[3:])))
        y.sum().backward()
    return step


def in_backend(spec: str, fn):
    def run():
        with sdpa_backend(spec):
            fn()
    return run


def seconds(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_bytes(fn, device: str) -> int:
    """Peak bytes allocated by fn above those allocated before it (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:  # the trace lists every allocation and free as a "[memory]" event
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    sizes = [e["args"]["Bytes"] for e in sorted(events, key=lambda e: e["ts"]) if e.get("name") == "[memory]"]
    return max(itertools.accumulate(sizes, initial=0))  # the running sum is what is held


@torch.no_grad()
def decode(layers: dict, lengths: list[int], args, steps: int, block: int = 8) -> dict:
    """{(mechanism, T): ms per token} with the state of a T-token context: the mean time of `block` consecutive
    steps (which amortises the cache misses of a context's first step), in the fastest of several rounds that
    go round-robin over the contexts of one mechanism. A step lasts well under a millisecond, so on a busy
    machine a round that another job preempted is many times slower; the fastest round is the undisturbed one."""
    x, times = torch.randn(args.batch, max(lengths) + 1, args.d_model, device=args.device), {}
    for m, layer in layers.items():
        with sdpa_backend(m):
            states = {T: layer(x[:, :T])[1] for T in lengths}
            for T in lengths:  # a first step each, untimed: it frees the prefill's memory
                _, states[T] = layer(x[:, T:T + 1], states[T])
                times[m, T] = []
            for _ in range(max(1, steps // block)):
                for T in lengths:
                    sync(args.device)
                    t0 = time.perf_counter()
                    for _ in range(block):
                        _, states[T] = layer(x[:, T:T + 1], states[T])
                    sync(args.device)
                    times[m, T].append((time.perf_counter() - t0) / block)
    return {key: min(t) * 1e3 for key, t in times.items()}


@torch.no_grad()
def recompute(layer, spec: str, T: int, args) -> float:
    """ms per token generating without a state: one forward over the whole (T+1)-token context (the fastest of
    three, as for the cached steps)."""
    x = torch.randn(args.batch, T + 1, args.d_model, device=args.device)
    with sdpa_backend(spec):
        return min(seconds(lambda: layer(x), args.device) for _ in range(3)) * 1e3


def crossover(rows: dict, mech: str, base: str, lengths: list[int]) -> str:
    """The shortest measured length from which `mech` trains faster than `base` at every longer length."""
    faster = [rows[mech, T]["train"] < rows[base, T]["train"] for T in lengths]
    for i, T in enumerate(lengths):
        if all(faster[i:]):
            note = " (the shortest measured)" if i == 0 else ""
            return f"{mech} trains faster than {base} from T = {T}{note}"
    return f"{mech} does not overtake {base} up to T = {lengths[-1]}"


def plot(rows: dict, mechanisms: list[str], lengths: list[int], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for m, color in zip(mechanisms, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])):
        for ax, key in zip(axes, ("train", "peak", "decode")):
            ax.plot(lengths, [rows[m, T][key] for T in lengths], marker="o", color=color, label=m)
        if rows[m, lengths[0]]["recompute"] is not None:
            axes[2].plot(lengths, [rows[m, T]["recompute"] for T in lengths], marker="x", ls="--",
                         color=color, label=f"{m} (recompute)")
    labels = ("train step (fwd+bwd), ms", "peak memory of a step, MiB", "generation, ms per token")
    for ax, label in zip(axes, labels):
        ax.set(xscale="log", yscale="log", xlabel="context length T", ylabel=label)
        ax.set_xticks(lengths, [str(T) for T in lengths], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mechanisms", nargs="+", default=MECHANISMS, help="conf/attention names[:key=value,...]")
    p.add_argument("--lengths", nargs="+", type=int, help=f"context lengths (default {LENGTHS})")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed training steps per configuration (median)")
    p.add_argument("--decode-steps", type=int, default=64, help="timed generation steps per context")
    p.add_argument("--core", action="store_true", help="time the mechanism's mix alone, without projections")
    p.add_argument("--recompute", action="store_true",
                   help="also each chunked mechanism with recompute=true (backward recomputes it), in the next row")
    p.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, 1 repeat, 24 decode steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: steady on a machine shared with other jobs; 0: torch's default)")
    p.add_argument("--png", default=None, help="write the plot here")
    p.add_argument("--markdown", default=None, help="also write the table here as markdown")
    args = p.parse_args(argv)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    if args.recompute:
        args.mechanisms = [s for m in args.mechanisms for s in with_recompute(m)]
    repeats, steps = (1, 24) if args.quick else (args.repeats, args.decode_steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    load, cores = os.getloadavg()[0], os.cpu_count()
    if args.device == "cpu" and torch.get_num_threads() > 1 and load > cores / 2:
        Console(stderr=True).print(f"[yellow]load average {load:.1f} on {cores} cores: other jobs are running, "
                                   "multi-threaded timings will be noisy; --threads 1 is steadier[/yellow]")
    torch.manual_seed(0)
    layers = {m: build(m, args.d_model, args.heads, args.device) for m in args.mechanisms}
    rows = {}
    started = time.perf_counter()
    for T in lengths:
        x = torch.randn(args.batch, T, args.d_model, device=args.device, requires_grad=True)
        fns = {m: in_backend(m, train_step(layer, x, args.core)) for m, layer in layers.items()}
        for fn in fns.values():  # warm-up
            fn()
        times = {m: [] for m in layers}
        for _ in range(repeats):
            for m, fn in fns.items():
                times[m].append(seconds(fn, args.device))
        for m, fn in fns.items():
            layers[m].zero_grad(set_to_none=True)
            rows[m, T] = {"train": statistics.median(times[m]) * 1e3,
                          "peak": peak_bytes(fn, args.device) / 2 ** 20,
                          "recompute": recompute(layers[m], m, T, args) if m.startswith("softmax") else None}
        del x, fns
    for key, ms in decode(layers, lengths, args, steps).items():
        rows[key]["decode"] = ms

    base = args.mechanisms[0]
    where = "core (mix only)" if args.core else "layer (projections included)"
    title = (f"one attention {where}: B={args.batch}, d_model={args.d_model}, heads={args.heads}, "
             f"{args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
             f"median of {repeats}")
    table = Table(title=title)
    columns = ["mechanism", "T", "train ms", f"÷ {base}", "peak MiB", f"÷ {base}", "decode ms/tok",
               "recompute ms/tok"]
    for c in columns:
        table.add_column(c, justify="left" if c == "mechanism" else "right")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for m in args.mechanisms:
        for T in lengths:
            r, b = rows[m, T], rows[base, T]
            cells = [m, str(T), f"{r['train']:.1f}", f"{r['train'] / b['train']:.2f}", f"{r['peak']:.1f}",
                     f"{r['peak'] / b['peak']:.2f}", f"{r['decode']:.3f}",
                     "" if r["recompute"] is None else f"{r['recompute']:.2f}"]
            table.add_row(*cells)
            lines.append("| " + " | ".join(cells) + " |")
    summary = [crossover(rows, m, base, lengths) for m in args.mechanisms if m != base]
    for m in args.mechanisms:
        if rows[m, lengths[0]]["recompute"] is not None:
            ratios = ", ".join(f"{rows[m, T]['recompute'] / rows[m, T]['decode']:.0f}× at {T}"
                               for T in lengths)
            summary.append(f"{m}: KV cache vs recomputing the context, per token: {ratios}")
        spread = [rows[m, T]["decode"] for T in lengths]
        summary.append(f"{m}: decode ms/token from T = {lengths[0]} to {lengths[-1]}: "
                       f"{spread[0]:.3f} -> {spread[-1]:.3f} ({spread[-1] / spread[0]:.2f}×)")
    summary.append(f"wall time {time.perf_counter() - started:.0f} s")
    console = Console(width=140)
    console.print(table)
    for line in summary:
        console.print(line)
    if args.png:
        plot(rows, args.mechanisms, lengths, args.png, title)
    if args.markdown:
        Path(args.markdown).write_text(title + "\n\n" + "\n".join(lines) + "\n\n" +
                                       "\n".join(f"- {s}" for s in summary) + "\n")
    return rows


if __name__ == "__main__":
    main()
