"""Fine-tuning on the Stan lyrics: from scratch against starting from a Shakespeare model, fully or with LoRA.

    python -m benchmarks.finetune --base outputs/<date>/<time>/checkpoints/best.ckpt [--steps 300] [--seeds 3]

--base is the model `python -m lam.train` (make train) writes on Tiny Shakespeare. Five runs per seed, each
`--steps` steps on data=stan with lam.train's defaults otherwise (lr 3e-3, 100 warmup steps, a cosine to the
last step; fp32), validated at the end on the same windows:
- scratch: the base's architecture with random weights;
- full: init_from=base, every weight trains, at the default lr and at a tenth of it;
- lora r=4, lora r=8: init_from=base lora=default lora.r=..., only the adapters train.
All read Stan with the base's 65-character alphabet (data.errors=replace: the 7 characters of Stan
that Shakespeare lacks read as '?'), so every val loss is over the same token ids. Prints a Markdown table of
val loss (mean and spread over the seeds), trainable parameters and seconds per run, and the base's own val
loss on those windows before any step on Stan.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import open_dict

from lam.config import compose_train
from lam.train import train
from lam.training.finetune import read_start

COMMON = ["data=stan", "data.errors=replace", "trainer.precision=32-true", "threads=1",
          "trainer.enable_progress_bar=false", "callbacks.samples.every_n_validations=0"]
VARIANTS = {
    "from scratch": [],
    "full fine-tune": ["init_from={base}"],
    "full fine-tune, lr 3e-4": ["init_from={base}", "optim.lr=3e-4"],
    "LoRA r=4": ["init_from={base}", "lora=default", "lora.r=4"],
    "LoRA r=8": ["init_from={base}", "lora=default", "lora.r=8"],
}


def run(variant: str, base: Path, steps: int, seed: int, out: Path) -> tuple[float, int, float]:
    """(val loss, trainable parameters, wall seconds) of one run."""
    overrides = [o.format(base=base) for o in VARIANTS[variant]]
    cfg = compose_train([*COMMON, *overrides, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                         f"seed={seed}"], out)
    if not overrides:  # from scratch: the base's architecture and alphabet, random weights
        start = read_start(base)
        with open_dict(cfg):
            cfg.model = start.model
            cfg.tokenizer.chars = start.tokenizer.chars
    begin = time.perf_counter()
    val_loss = train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    return val_loss, metrics["trainable_params"], time.perf_counter() - begin


def base_val_loss(base: Path, out: Path) -> float:
    """The base model's val loss on the same windows, untrained on Stan."""
    cfg = compose_train([*COMMON, f"init_from={base}"], out)
    start = read_start(base)
    datamodule = instantiate(cfg.data, tokenizer=start.tokenizer)
    datamodule.setup()
    net = instantiate(start.model, vocab_size=start.tokenizer.vocab_size)
    start.load_into(net)
    total = count = 0
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            total += F.cross_entropy(net.eval()(x)[0].flatten(0, 1), y.flatten()).item() * len(x)
            count += len(x)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="checkpoint of the Shakespeare model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    results = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        untrained = base_val_loss(args.base.resolve(), Path(tmp) / "base")
        for seed in range(1, args.seeds + 1):
            for variant in VARIANTS:
                out = Path(tmp) / f"{re.sub(r'[^a-z0-9]+', '_', variant.lower())}-s{seed}"
                results[variant].append(run(variant, args.base.resolve(), args.steps, seed, out))
    print(f"\n| Stan, {args.steps} steps | val loss (mean ± sd, {args.seeds} seeds) | trainable parameters "
          "| s per run |")
    print("| --- | --- | --- | --- |")
    print(f"| the Shakespeare model as it is (no step on Stan) | {untrained:.3f} | 0 | |")
    for variant, rows in results.items():
        losses = [r[0] for r in rows]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(f"| {variant} | {statistics.mean(losses):.3f} ± {spread:.3f} | {rows[0][1]:,} | "
              f"{statistics.mean(r[2] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
