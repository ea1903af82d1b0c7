"""Decoding speed at batch 1: ms per generated token, eager and with `compile=True`, from 256 to 8192 tokens of
context, against a nanoGPT-style loop that recomputes the whole context for every token.

    python -m benchmarks.decode              # every mechanism, contexts 256, 1024, 8192 (2-6 min on 2 cores)
    python -m benchmarks.decode --quick      # softmax and linear, 256 and 1024

Models: the default sizes (4 layers, 4 heads, 128 wide, vocabulary 65), random weights (speed does not depend
on them), learned positions with a table long enough for the longest context. Per context L: a random prompt
of L tokens, then `--tokens` greedy tokens through lam.models.sampling.stream, the contexts taking turns in
8 rounds (a drift in the machine's speed then reaches every L alike); the median time of tokens 2.. is the
per-token time (the first includes the prompt's pass). "recompute" is stream(use_cache=False):
each token one forward over the whole context, as nanoGPT's generate does. "default model" is the default
config as `make train` trains it (linear attention, block 64): past 64 tokens every step recomputes the cropped
window, since its position table ends there, or, with context_shift, restarts from the last 32 once (the cache
carries on); tokens/s over --tokens-default tokens from a 1-token prompt, the median of --repeats runs, the
four variants taking turns.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from benchmarks.attention import CONF, MECHANISMS
from lam.models import LAM
from lam.models.sampling import stream

CONTEXTS = [256, 1024, 8192]


def build(name: str, block_size: int) -> LAM:
    torch.manual_seed(0)
    attention = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))  # a partial: each YAML is `_partial_: true`
    return LAM(vocab_size=65, attention=attention, block_size=block_size).eval()


def per_token_ms(net: LAM, contexts: list[int], tokens: int, rounds: int = 8, **options) -> list[float]:
    """Per context L, the median ms between the `tokens` - 1 generated tokens after the first (which includes
    the prompt's pass). The contexts take turns, a few tokens each per round, so that a drift in the machine's
    speed reaches every L alike."""
    streams = []
    for L in contexts:
        prompt = torch.randint(65, (1, L), generator=torch.Generator().manual_seed(1))
        streams.append(stream(net, prompt, tokens, temperature=0, **options))
        next(streams[-1])  # the prompt's pass
    gaps: list[list[float]] = [[] for _ in contexts]
    per_turn = -(-(tokens - 1) // rounds)
    while len(gaps[0]) < tokens - 1:
        for steps, gaps_of_l in zip(streams, gaps):
            for _ in range(min(per_turn, tokens - 1 - len(gaps_of_l))):
                start = time.perf_counter()
                next(steps)
                gaps_of_l.append(time.perf_counter() - start)
    return [1000 * statistics.median(g) for g in gaps]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mechanisms", nargs="+", default=MECHANISMS)
    parser.add_argument("--contexts", nargs="+", type=int, default=CONTEXTS)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per measurement")
    parser.add_argument("--tokens-default", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5, help="runs of the default model's tokens (median)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.mechanisms, args.contexts, args.tokens = ["softmax", "linear"], [256, 1024], 32
    console = Console(width=140)
    block = max(args.contexts) + args.tokens + 1
    table = Table(title=f"decoding at batch 1: ms per token (median of {args.tokens - 1}), torch threads "
                        f"{torch.get_num_threads()}")
    for col in ("mechanism", "mode", *(f"L={L}" for L in args.contexts), "flat (max/min)", "compile s"):
        table.add_column(col, justify="left" if col in ("mechanism", "mode") else "right")
    rows = {}
    for name in args.mechanisms:
        for mode in ("eager", "compiled"):
            net = build(name, block)
            compile = mode == "compiled"
            torch.compiler.reset()  # dynamo's recompile limit counts the graphs of LAM.forward over all models
            if compile:  # the first call compiles; a short warm-up keeps it out of the per-token times
                t = time.perf_counter()
                per_token_ms(net, [8], 4, compile=True)
                compile_s = time.perf_counter() - t
            ms = per_token_ms(net, args.contexts, args.tokens, compile=compile)
            rows[name, mode] = ms
            table.add_row(name, mode, *(f"{m:.2f}" for m in ms), f"{max(ms) / min(ms):.2f}",
                          f"{compile_s:.0f}" if compile else "")
            console.print(f"{name} {mode}: " + ", ".join(f"{m:.2f}" for m in ms), highlight=False)
    if "softmax" in args.mechanisms and 1024 in args.contexts:
        recompute, = per_token_ms(build("softmax", block), [1024], 8, use_cache=False)
        table.add_row("softmax", "recompute", *("" if L != 1024 else f"{recompute:.2f}" for L in args.contexts),
                      "", "")
        at = args.contexts.index(1024)
        for mode in ("eager", "compiled"):
            console.print(f"softmax {mode} at L=1024: {recompute / rows['softmax', mode][at]:.1f}x the recompute "
                          "loop", highlight=False)
    console.print(table)

    default = Table(title=f"the default model (conf/: linear attention, block 64): {args.tokens_default} tokens "
                          f"from a 1-token prompt, median of {args.repeats} runs")
    for col in ("mode", "past 64 tokens", "tokens/s", "ms/token"):
        default.add_column(col, justify="left" if col in ("mode", "past 64 tokens") else "right")
    torch.compiler.reset()
    variants = {}  # (mode, shift) -> (its model, stream's options); each compiled variant compiles its own steps
    for mode, shift in (("eager", False), ("compiled", False), ("eager", True), ("compiled", True)):
        variants[mode, shift] = build("linear", 64), dict(temperature=0, compile=mode == "compiled",
                                                          context_shift=shift)
        for _ in stream(variants[mode, shift][0], torch.zeros(1, 1, dtype=torch.long), 70,
                        **variants[mode, shift][1]):
            pass  # compiles the one-token step, and the window recomputed past the table's end
    runs: dict[tuple, list[float]] = {key: [] for key in variants}
    for _ in range(args.repeats):  # the variants take turns, as the contexts do above
        for key, (net, options) in variants.items():
            t = time.perf_counter()
            for _ in stream(net, torch.zeros(1, 1, dtype=torch.long), args.tokens_default, **options):
                pass
            runs[key].append(time.perf_counter() - t)
    for (mode, shift), times in runs.items():
        seconds = statistics.median(times)
        default.add_row(mode, "context shift" if shift else "the last 64, recomputed",
                        f"{args.tokens_default / seconds:,.0f}", f"{1000 * seconds / args.tokens_default:.2f}")
    console.print(default)


if __name__ == "__main__":
    main()
