"""Training speed: LAM (lam.train: Hydra + Lightning) against a bare PyTorch loop, Tiny Shakespeare characters.

    python -m benchmarks.train_speed                    # tokens/s, softmax and linear, 3 repeats (< 10 min)
    python -m benchmarks.train_speed --quick            # 1 repeat, fewer steps (< 2 min)
    python -m benchmarks.train_speed --mode quality     # time to val loss <= 1.886, nanoGPT vs the speedrun (7 min)
    python -m benchmarks.train_speed --mode profile     # torch.profiler: time in aten ops vs around them
    python -m benchmarks.train_speed --mode overhead    # the framework's ms a step, on a model too small to hide it
    python -m benchmarks.train_speed --lam compile=true optim.fused=false   # extra lam.train overrides

Both sides train lam.models.LAM at nanoGPT's CPU recipe (experiment=shakespeare_char_cpu: 4 layers, 4 heads,
128 dims, block 64, batch 12, lr 1e-3 with 100 warmup steps and a cosine over 2000 steps, AdamW betas 0.9/0.99,
weight decay 0.1 on matrices, gradient clipping at 1.0):
- lam: `lam.train.train(cfg)`, the config composed with Hydra's compose API from conf/ and the overrides, so
  every default of conf/ (threads, fused AdamW, progress bar, checkpoints, ...) is what is measured.
- plain: the loop a nanoGPT user writes: token ids memory-mapped from the same .bin files, nanoGPT's get_batch
  (random offsets, a Python list of slices stacked), torch.optim.AdamW as constructed by default (no fused
  flag), torch's default thread count, no framework imported.

Each run is a fresh subprocess (peak RSS = its own ru_maxrss); runs alternate lam/plain, and the order flips
every repeat, so that a busy machine slows both alike. Speed mode: ms/step is the steady state, from the end of
step `--warmup` to the last step, with no validation inside (lam: from the Throughput callback's elapsed_s in the
csv; plain: perf_counter around the loop); the median over repeats is reported, and beside it the median of the
ratios within each repeat's lam/plain pair (adjacent in time, so less moved by a host that drifts). MFU = tokens/s x
lam.models.flops.flops_per_token (attention term of the mechanism in use) / the fp32 matmul peak measured here.
Quality mode: nanoGPT's recipe exactly on the plain side (the hyperparameters above, nanoGPT's warmup
lr·(it+1)/(warmup+1), weight decay on every parameter of 2 or more dimensions, embeddings included), run to
its 2000 steps and evaluated as nanoGPT evaluates it (every 250 steps, 20 batches of 12 windows, here lam's own
validation windows), against `--preset` (experiment=shakespeare_char_speedrun) as it stands. See quality_main.
Overhead mode: what LAM's loop costs around a step, where the kernels cannot hide it: OVERHEAD's model (1 layer,
16 wide, block 8, batch 2) on one thread, fp32 and torch's AdamW on both sides, every other default of conf/ on
LAM's; 1500 steps, ms/step from step 500 on, 5 repeats alternating, the difference per adjacent pair.
Profile mode: one run each under torch.profiler from step `--warmup` on; per step, the time inside aten ops
(the kernels, the same code on both sides) against the time around them (Python, autograd, framework).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.886  # nanoGPT's val loss for this recipe after 2000 steps (nanoGPT README: 1.88)
RECIPE = ["experiment=shakespeare_char_cpu"]  # nanoGPT's: the plain loop's always, LAM's in speed mode
SPEEDRUN = "shakespeare_char_speedrun"  # LAM's preset in quality mode
NANOGPT_EVAL = {"eval_every": 250, "eval_batches": 20}  # nanoGPT's eval_interval and the recipe's eval_iters
# overhead mode: a model whose step is ~1 ms of kernels, both sides on one thread, in fp32 with torch's AdamW
OVERHEAD = ["model.n_layer=1", "model.n_head=1", "model.n_embd=16", "data.block_size=8", "data.batch_size=2",
            "threads=1"]
OVERHEAD_LAM = ["trainer.precision=32-true", "optim.fused=null"]


# ---- the two workers, each in its own process ------------------------------------------------------------------
class OpProfile:
    """torch.profiler over the steady-state steps, summarised per step: ms inside aten ops (self time, on the
    calling thread; intra-op threads work inside it), ms around them, and each op's share."""

    def start(self) -> None:
        import torch

        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def stop(self, steps: int) -> dict:
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        ops = {e.key: e.self_cpu_time_total / 1000 / steps for e in self.prof.key_averages()
               if e.key.startswith("aten::")}
        in_ops = sum(ops.values())
        return {"steps": steps, "ms_step": 1000 * wall / steps, "ops_ms": in_ops,
                "around_ms": 1000 * wall / steps - in_ops,
                "top_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12])}


def op_profile_callback(start: int, out: str):
    """A Lightning callback (for `+callbacks.x._target_=`) running OpProfile from step `start` to the last
    training step, written to `out` as JSON."""
    from lightning.pytorch import Callback

    class ProfileSteps(Callback):
        def __init__(self):
            self.profile = OpProfile()

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == start:
                self.profile.start()

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == trainer.max_steps:
                Path(out).write_text(json.dumps(self.profile.stop(trainer.global_step - start)))

    return ProfileSteps()


def run_lam(spec: dict) -> dict:
    """lam.train.train on the composed config; ms/step from the Throughput callback's elapsed_s."""
    import csv

    from lam.config import compose_train
    from lam.train import train

    start = time.perf_counter()
    cfg = compose_train(spec["overrides"], spec["output_dir"])
    train(cfg)
    with open(Path(spec["output_dir"]) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    elapsed = {int(r["step"]) + 1: float(r["elapsed_s"]) for r in rows if r.get("elapsed_s")}
    curve = [[int(r["step"]), float(r["val/loss"])] for r in rows if r.get("val/loss")]
    vals = [v for _, v in curve]
    metrics = json.loads((Path(spec["output_dir"]) / "metrics.json").read_text())
    out = {"steps": metrics["steps"], "best_val": min(vals), "final_val": vals[-1], "curve": curve,
           "run_s": time.perf_counter() - start}
    if spec.get("profile"):
        out["profile"] = json.loads(Path(spec["profile"]).read_text())
    warm = min((s for s in elapsed if s >= spec["warmup"]), default=None)
    if warm is not None and max(elapsed) > warm:
        last = max(elapsed)
        out["ms_step"] = 1000 * (elapsed[last] - elapsed[warm]) / (last - warm)
    return out


def run_plain(spec: dict) -> dict:
    """The bare loop: no Lightning, no Hydra; the recipe's hyperparameters, torch's defaults otherwise."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lam.models import LAM

    start = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    train_data = np.memmap(spec["train_bin"], dtype=spec["dtype"], mode="r")
    val_data = np.memmap(spec["val_bin"], dtype=spec["dtype"], mode="r")
    B, T, hp = spec["batch_size"], spec["block_size"], spec["hp"]
    attention = dict(spec["attention"])
    cls_path = attention.pop("_target_")
    attention.pop("_partial_", None)
    module, name = cls_path.rsplit(".", 1)
    net = LAM(vocab_size=spec["vocab_size"], block_size=T,
              attention=functools.partial(getattr(importlib.import_module(module), name), **attention),
              **spec["model"])
    # nanoGPT's groups: every parameter of 2 or more dimensions decays, embeddings included
    decay = [p for p in net.parameters() if p.dim() >= 2]
    other = [p for p in net.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                                   {"params": other, "weight_decay": 0.0}], lr=hp["lr"], betas=hp["betas"])

    def get_batch():
        ix = torch.randint(len(train_data) - T, (B,))
        x = torch.stack([torch.from_numpy(train_data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train_data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(step: int) -> float:
        if step < hp["warmup"]:  # nanoGPT's warmup
            return hp["lr"] * (step + 1) / (hp["warmup"] + 1)
        progress = min(1.0, (step - hp["warmup"]) / max(1, hp["total"] - hp["warmup"]))
        return hp["lr"] * (hp["min_ratio"] + (1 - hp["min_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))

    # lam's validation windows (TextDataModule.val_dataloader: EvenWindows of eval_batches x batch_size)
    starts = np.linspace(0, len(val_data) - T - 1, spec["eval_batches"] * B).astype(np.int64)
    val_windows = torch.from_numpy(np.stack([val_data[s:s + T + 1] for s in starts]).astype(np.int64))

    @torch.no_grad()
    def evaluate() -> float:
        net.eval()
        losses = [F.cross_entropy(net(w[:, :-1])[0].flatten(0, 1), w[:, 1:].flatten()).item()
                  for w in val_windows.split(B)]
        net.train()
        return sum(losses) / len(losses)

    best, warm_t, step, profile, curve = math.inf, None, 0, OpProfile(), []
    while step < spec["steps"]:
        if spec.get("profile") and step == spec["warmup"]:
            profile.start()
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        x, y = get_batch()
        logits, _ = net(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), hp["clip"])
        optimizer.step()
        step += 1
        if step == spec["warmup"]:
            warm_t = time.perf_counter()
        if spec["quality"] and (step % spec["eval_every"] == 0 or step == spec["steps"]):
            loss = evaluate()
            curve.append([step, loss, time.perf_counter() - start])
            best = min(best, loss)
    end = time.perf_counter()
    profiled = profile.stop(step - spec["warmup"]) if spec.get("profile") else None
    out = {"steps": step, "best_val": best if spec["quality"] else evaluate(), "run_s": end - start,
           "curve": curve}
    if profiled:
        out["profile"] = profiled
    if warm_t is not None and step > spec["warmup"]:
        out["ms_step"] = 1000 * (end - warm_t) / (step - spec["warmup"])
    return out


def worker(kind: str, spec: dict) -> None:
    result = (run_lam if kind == "lam" else run_plain)(spec)
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps(result), flush=True)


# ---- the driver ----------------------------------------------------------------------------------------------------
def matmul_peak(threads: int | None, n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 GFLOP/s of an n x n matmul with the given thread count (None: torch's default)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(before)
    return 2 * n ** 3 / best / 1e9


def plain_spec(cfg, attention_cfg: dict) -> dict:
    """What the plain loop needs from the composed recipe: sizes, hyperparameters, the .bin files."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    data = instantiate(cfg.data)
    meta = data.meta
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
             if k not in ("_target_", "attention", "block_size")}
    return {"train_bin": str(data.cache_dir / "train.bin"), "val_bin": str(data.cache_dir / "val.bin"),
            "dtype": meta["dtype"], "vocab_size": meta["vocab_size"], "seed": cfg.seed,
            "batch_size": cfg.data.batch_size, "block_size": cfg.data.block_size, "model": model,
            "eval_batches": cfg.data.eval_batches, "threads": cfg.get("threads"),
            "attention": attention_cfg,
            "hp": {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay,
                   "warmup": cfg.scheduler.warmup_steps, "total": cfg.trainer.max_steps,
                   "min_ratio": cfg.scheduler.min_lr_ratio, "clip": cfg.trainer.gradient_clip_val}}


def launch(kind: str, spec: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_speed", "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{kind} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": wall}


def print_profile(console, profiles: dict) -> None:
    """Per attention, medians over repeats: ms/step inside aten ops and around them, LAM against plain, and
    the costliest ops."""
    from rich.table import Table

    def median(runs, key, op=None):
        return statistics.median(r["top_ops"].get(op, math.nan) if op else r[key] for r in runs)

    table = Table(title=f"profile (torch.profiler, steady state): ms per step, median of "
                        f"{len(next(iter(profiles.values()))['lam'])}")
    for col in ("attention", "variant", "step", "in aten ops", "around ops"):
        table.add_column(col, justify="left" if col in ("attention", "variant") else "right")
    for attention, sides in profiles.items():
        for kind, runs in sides.items():
            table.add_row(attention, kind, *(f"{median(runs, k):.1f}" for k in ("ms_step", "ops_ms", "around_ms")))
    console.print(table)
    for attention, sides in profiles.items():
        ops = Table(title=f"{attention}: costliest aten ops, self ms per step")
        for col in ("op", "lam", "plain"):
            ops.add_column(col, justify="left" if col == "op" else "right")
        for name in list(sides["lam"][0]["top_ops"])[:8]:
            ops.add_row(name, *(f"{median(sides[k], None, name):.2f}" for k in ("lam", "plain")))
        console.print(ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["speed", "quality", "profile", "overhead"], default="speed")
    parser.add_argument("--attention", nargs="+", default=["softmax", "linear"])
    parser.add_argument("--steps", type=int, default=300, help="speed mode: training steps per run")
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the steady state")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default=SPEEDRUN, help="quality mode: LAM's experiment preset")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 100 steps")
    parser.add_argument("--lam", nargs="*", default=[], help="extra lam.train overrides (LAM side only)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], json.loads(args.worker[1]))
    if args.quick:
        args.repeats, args.steps, args.warmup = 1, 100, 30
    if args.mode == "quality":
        return quality_main(args)
    if args.mode == "overhead":
        return overhead_main(args)
    profiling = args.mode == "profile"

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    from lam.config import compose_train
    from lam.models.flops import flops_per_token

    console = Console(width=130)
    tmp = Path(tempfile.mkdtemp(prefix="lam-train-speed-"))
    logging = ["callbacks.throughput.window=10", "trainer.log_every_n_steps=10"]
    specs, flops = {}, {}
    for attention in args.attention:
        # no validation inside the measured steps: one at the end (lam.train's final measure)
        lam = [*RECIPE, *logging, f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
               *args.lam, f"attention={attention}"]
        cfg = compose_train([*RECIPE, f"attention={attention}"], tmp / "compose")
        plain = plain_spec(cfg, OmegaConf.to_container(cfg.attention, resolve=True))
        net = instantiate(cfg.model, vocab_size=plain["vocab_size"])
        flops[attention] = flops_per_token(net, cfg.data.block_size)
        specs[attention] = {
            "lam": {"overrides": lam, "warmup": args.warmup},
            "plain": {**plain, "steps": args.steps, "warmup": args.warmup, "quality": False}}
        threads = cfg.get("threads")
    peak = matmul_peak(threads)
    console.print(f"load average before: {os.getloadavg()}")

    results = {(a, k): [] for a in args.attention for k in ("lam", "plain")}
    for r in range(args.repeats):
        for attention in args.attention:
            for kind in (("lam", "plain") if r % 2 == 0 else ("plain", "lam")):
                spec = dict(specs[attention][kind])
                if kind == "lam":
                    spec["output_dir"] = str(tmp / f"{attention}-{r}")
                if profiling:
                    spec["profile"] = str(tmp / f"{attention}-{kind}-profile.json")
                    if kind == "lam":
                        spec["overrides"] = [*spec["overrides"], *(
                            f"+callbacks.op_profile.{k}={v}" for k, v in (
                                ("_target_", "benchmarks.train_speed.op_profile_callback"),
                                ("start", args.warmup), ("out", spec["profile"])))]
                res = launch(kind, spec)
                results[(attention, kind)].append(res)
                console.print(f"repeat {r} {attention:7s} {kind:5s} " + json.dumps(
                    {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items() if k != "profile"}))
    console.print(f"load average after: {os.getloadavg()}")
    if profiling:
        profiles = {a: {k: [x["profile"] for x in results[(a, k)]] for k in ("lam", "plain")} for a in args.attention}
        if args.json:
            args.json.write_text(json.dumps(profiles, indent=1))
        return print_profile(console, profiles)
    peak = max(peak, matmul_peak(threads))  # before and after the runs: the quieter moment counts

    block, batch = specs[args.attention[0]]["plain"]["block_size"], specs[args.attention[0]]["plain"]["batch_size"]
    table = Table(title=f"speed: LAM vs plain PyTorch, recipe sizes, {args.repeats} repeat(s), median")
    for col in ("attention", "variant", "ms/step", "tokens/s", "MFU %", "peak RSS MiB", "LAM ÷ plain tok/s",
                "÷ within pairs"):
        table.add_column(col, justify="left" if col in ("attention", "variant") else "right")
    pair_ratios = {}
    for attention in args.attention:
        med = {k: {m: statistics.median(x[m] for x in results[(attention, k)]) for m in ("ms_step", "rss_mib")}
               for k in ("lam", "plain")}
        # each repeat's two runs are adjacent in time: their ratio leaves out the drift between repeats
        pair_ratios[attention] = [p["ms_step"] / q["ms_step"] for p, q in
                                  zip(results[(attention, "plain")], results[(attention, "lam")])]
        for kind in ("lam", "plain"):
            m = med[kind]
            tps = batch * block / (m["ms_step"] / 1000)
            ratio = med["plain"]["ms_step"] / med["lam"]["ms_step"]
            lam_row = kind == "lam"
            table.add_row(attention, kind, f"{m['ms_step']:.1f}", f"{tps:,.0f}",
                          f"{100 * tps * flops[attention] / (peak * 1e9):.1f}", f"{m['rss_mib']:.0f}",
                          f"{ratio:.2f}" if lam_row else "",
                          f"{statistics.median(pair_ratios[attention]):.2f}" if lam_row else "")
    console.print(table)
    console.print("LAM ÷ plain tok/s, repeat by repeat: " + "; ".join(
        f"{a} " + ", ".join(f"{r:.2f}" for r in rs) for a, rs in pair_ratios.items()))
    console.print("FLOPs/token (training, lam.models.flops): "
                  + ", ".join(f"{a}: {f / 1e6:.2f} M" for a, f in flops.items())
                  + f"; MFU against the fp32 matmul peak, {peak:.1f} GFLOP/s (1024^3, best of 20, "
                  f"threads={threads or torch.get_num_threads()})")
    if args.json:
        args.json.write_text(json.dumps({
            "peak_gflops": peak, "flops": flops, "pair_ratios": pair_ratios,
            "results": {f"{a}/{k}": v for (a, k), v in results.items()}}, indent=1))


def overhead_main(args) -> None:
    """LAM's ms/step against the plain loop's on OVERHEAD's model, repeats alternating (the order flips every
    repeat); the framework's cost is the difference within each adjacent pair, whose median is reported."""
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    from lam.config import compose_train

    steps = args.steps if args.steps != 300 else 1500  # 300: the speed mode's default
    warmup = args.warmup if args.warmup != 50 else 500
    console = Console(width=130)
    tmp = Path(tempfile.mkdtemp(prefix="lam-overhead-"))
    both = [*RECIPE, *OVERHEAD, "attention=softmax", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}"]
    cfg = compose_train(both, tmp / "compose")
    plain = {**plain_spec(cfg, OmegaConf.to_container(cfg.attention, resolve=True)), "steps": steps,
             "warmup": warmup, "quality": False}
    lam = {"overrides": [*both, *OVERHEAD_LAM, *args.lam], "warmup": warmup}
    console.print(f"load average before: {os.getloadavg()}")
    pairs = []
    for r in range(args.repeats):
        ms = {}
        for kind in (("lam", "plain") if r % 2 == 0 else ("plain", "lam")):
            ms[kind] = launch(kind, {**lam, "output_dir": str(tmp / f"lam-{r}")} if kind == "lam" else plain)["ms_step"]
        console.print(f"repeat {r}: lam {ms['lam']:.3f} ms/step, plain {ms['plain']:.3f}")
        pairs.append(ms)
    console.print(f"load average after: {os.getloadavg()}")
    table = Table(title=f"overhead: ms/step on a 1-layer, 16-wide model (block 8, batch 2, one thread, fp32), "
                        f"{args.repeats} repeats")
    for col in ("", "repeats", "median"):
        table.add_column(col, justify="left" if not col else "right")
    for name, values in (("lam", [p["lam"] for p in pairs]), ("plain", [p["plain"] for p in pairs]),
                         ("lam - plain", [p["lam"] - p["plain"] for p in pairs])):
        table.add_row(name, ", ".join(f"{v:.2f}" for v in values), f"{statistics.median(values):.2f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(pairs, indent=1))


def quality_main(args) -> None:
    """Time to val loss <= TARGET. The plain loop runs nanoGPT's recipe to its end, evaluating as nanoGPT does
    (every 250 steps, 20 batches of 12 windows: lam's validation windows); LAM runs `--preset` as it stands,
    its own evaluation schedule included, and counts if its last validation is <= TARGET. Each side's time is
    the whole subprocess up to the moment the target is met: LAM's whole run; the plain loop's start-up plus
    the time of its first evaluation <= TARGET (its whole run if none is)."""
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.table import Table

    from lam.config import compose_train

    console = Console(width=130)
    tmp = Path(tempfile.mkdtemp(prefix="lam-quality-"))
    cfg = compose_train(RECIPE, tmp / "compose")  # nanoGPT's recipe: softmax attention
    nanogpt = {**plain_spec(cfg, OmegaConf.to_container(cfg.attention, resolve=True)), **NANOGPT_EVAL,
               "steps": cfg.trainer.max_steps, "warmup": args.warmup, "quality": True}
    lam = {"overrides": [f"experiment={args.preset}", "callbacks.throughput.window=10", *args.lam],
           "warmup": args.warmup}
    console.print(f"load average before: {os.getloadavg()}")
    runs = {"lam": [], "plain": []}
    for r in range(args.repeats):
        for kind in (("lam", "plain") if r % 2 == 0 else ("plain", "lam")):
            spec = {**lam, "output_dir": str(tmp / f"lam-{r}")} if kind == "lam" else nanogpt
            res = launch(kind, spec)
            if kind == "lam":
                res["reached"], res["to_target_s"] = res["final_val"] <= TARGET, res["wall_s"]
            else:
                startup = res["wall_s"] - res["run_s"]
                hit = next(((step, t) for step, loss, t in res["curve"] if loss <= TARGET), None)
                res["reached"] = hit is not None
                res["to_target_s"] = startup + hit[1] if hit else res["wall_s"]
            runs[kind].append(res)
            console.print(f"repeat {r} {kind:5s} curve " + ", ".join(f"{c[0]}: {c[1]:.4f}" for c in res["curve"])
                          + f"; wall {res['wall_s']:.1f} s")
    console.print(f"load average after: {os.getloadavg()}")
    table = Table(title=f"quality: time to val loss <= {TARGET} (20 x 12 windows), {args.repeats} repeat(s), "
                        "median")
    for col in ("variant", "steps", "last val", "reached", "ms/step", "s to target", "LAM ÷ plain"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    med = {k: {m: statistics.median(float(x[m]) for x in v)
               for m in ("steps", "ms_step", "to_target_s")} for k, v in runs.items()}
    for kind, name in (("lam", f"lam experiment={args.preset}"), ("plain", "plain loop, nanoGPT's recipe")):
        m = med[kind]
        last = statistics.median(x["curve"][-1][1] for x in runs[kind])
        table.add_row(name, f"{m['steps']:.0f}", f"{last:.4f}", "yes" if all(x["reached"] for x in runs[kind])
                      else "no", f"{m['ms_step']:.1f}", f"{m['to_target_s']:.1f}",
                      f"{med['lam']['to_target_s'] / med['plain']['to_target_s']:.2f}" if kind == "lam" else "")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
