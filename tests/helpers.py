"""Shared by the tests: composing configs, tiny run settings, a synthetic corpus, reading run folders."""

from __future__ import annotations

import csv
import functools
import os
import random
import signal
from pathlib import Path

import lightning as L

from lam.config import compose_train  # noqa: F401 (the tests import it from here with the other helpers)

# a run small enough for a few seconds of CPU, and a LAM decoder to match
TINY_MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32"]
TINY_RUN = [
    "data.block_size=32", "data.batch_size=4", "data.eval_batches=2",
    "trainer.max_steps=30", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1",
    "scheduler.warmup_steps=5", "optim.lr=3e-3",
    "callbacks.samples.max_new_tokens=20", "trainer.enable_progress_bar=false",
    "callbacks.model_summary=null", "+trainer.enable_model_summary=false",
]
TINY = TINY_MODEL + TINY_RUN
# a 5-step run of the tiny model with one validation and no samples, as the sweeps' jobs train
SHORT_RUN = [*TINY, "trainer.max_steps=5", "trainer.val_check_interval=5", "callbacks.samples=null"]


def write_corpus(path: Path, n_chars: int = 20_000, seed: int = 0) -> Path:
    """Pseudo-English from a tiny vocabulary: structured enough that a model's loss falls within steps."""
    rng = random.Random(seed)
    words = "the a king queen speaks walks to from castle night day and with my lord sweet".split()
    lines = []
    while sum(map(len, lines)) < n_chars:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that logged `key`."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


class StopAt(L.Callback):
    """Stops training after `step` optimizer steps, as an interrupted run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class InterruptAt(StopAt):
    """Presses Ctrl-C, in effect, after `step` optimizer steps: raises KeyboardInterrupt."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt


class CtrlCInsideStep(L.Callback):
    """Sends this process SIGINT `presses` times, as Ctrl-C would, inside optimizer step `step`: after the
    weights took it, before Lightning counts it."""

    def __init__(self, step: int, presses: int = 1):
        self.step, self.presses = step, presses

    def on_train_start(self, trainer, *args) -> None:
        optimizer = trainer.optimizers[0]
        step = optimizer.step  # the scheduler's counting wrapper, where it has one

        @functools.wraps(step)  # keeps the marks Lightning's scheduler check reads
        def step_then_signal(*args, **kwargs):
            out = step(*args, **kwargs)
            if trainer.global_step + 1 == self.step:
                for _ in range(self.presses):
                    os.kill(os.getpid(), signal.SIGINT)
            return out

        optimizer.step = step_then_signal
