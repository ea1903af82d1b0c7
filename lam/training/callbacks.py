"""Callbacks: a step-labelled progress bar, training throughput, sample generations and the checkpoint taken
when training is interrupted."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput as LightningThroughput
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from rich import get_console
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from lam.errors import UserError
from lam.models import stream
from lam.models.flops import flops_per_token


def run_eagerly():
    """A context in which torch.compile'd modules run their eager code (torch >= 2.6; elsewhere no change)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


class StepProgressBar(RichProgressBar):
    """Rich's progress bar, labelled "train" instead of Lightning's "Epoch 0/-2": LAM's training stream is
    endless and runs are measured in steps (the bar counts them up to trainer.max_steps).

    refresh_interval_s: redraw the bar and its metrics after a training batch at most every this many seconds
    (as tqdm's mininterval), and after the first and the last. Lightning's RichProgressBar redraws after every
    batch: 2.4 ms a step on a 2-core AVX512-BF16 Xeon, more than the whole step of a tiny model
    (benchmarks/RESULTS.md, Training speed)."""

    SHOWN = ("train/loss", "tokens_per_sec")

    def __init__(self, refresh_interval_s: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if refresh_interval_s < 0:
            raise ValueError(f"refresh_interval_s must be >= 0, got {refresh_interval_s}")
        self.refresh_interval_s = refresh_interval_s
        self.drawn_at = -math.inf

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.monotonic()
        last = trainer.global_step >= (trainer.max_steps if trainer.max_steps > 0 else float("inf"))
        if now - self.drawn_at >= self.refresh_interval_s or last or trainer.should_stop:
            self.drawn_at = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    def get_metrics(self, trainer, pl_module) -> dict:
        """Lightning's (the validation metrics), and SHOWN of the module's step metrics: this step's where it
        writes them, else the last written."""
        items = super().get_metrics(trainer, pl_module)
        step = {**getattr(pl_module, "logged_step_metrics", {}), **getattr(pl_module, "step_metrics", {})}
        shown = {k: float(step[k]) for k in self.SHOWN if k in step}
        return {**items, **{k: f"{v:.0f}" if v >= 1000 else v for k, v in shown.items()}}  # 12051, not 12051.000


class Throughput(L.Callback):
    """Adds `tokens_per_sec` (all ranks together, over the last `window` batches) and `elapsed_s`, the
    training time so far, to the step metrics LanguageModel writes (every trainer.log_every_n_steps); also
    `flops_per_sec` (lam.models.flops' count) and, on GPUs whose peak Lightning knows, `mfu`. Computed by
    Lightning's Throughput, the one its ThroughputMonitor uses, on a clock that stops from the start of each
    validation to the next training batch, so that validations and the samples and checkpoints taken after them
    are not counted. (ThroughputMonitor itself counts what follows a validation's last batch, the samples and
    the checkpoint, as training time, and logs validation throughput among the step metrics, at validation
    batch counts.)"""

    def __init__(self, window: int = 10):
        self.window = window

    def on_train_start(self, trainer, pl_module) -> None:
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(trainer.precision).split("-")[0],
                                                                   torch.float32)
        self.throughput = LightningThroughput(available_flops=get_available_flops(pl_module.device, dtype),
                                              world_size=trainer.world_size, window_size=self.window + 1)
        self.throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)  # the window's first edge
        self.flops_per_token = flops_per_token(pl_module.net, trainer.datamodule.block_size)
        self.trained_s, self.resumed_at = 0.0, None  # time trained before the clock last started, and when
        self.batches = self.samples = self.tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.resumed_at is None:
            self.resumed_at = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.resumed_at is not None:
            self.trained_s += time.perf_counter() - self.resumed_at
            self.resumed_at = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = self.trained_s + time.perf_counter() - self.resumed_at
        tokens = batch[0].numel()
        self.batches, self.samples, self.tokens = self.batches + 1, self.samples + batch[0].shape[0], \
            self.tokens + tokens
        self.throughput.update(time=elapsed, batches=self.batches, samples=self.samples, lengths=self.tokens,
                               flops=self.flops_per_token * tokens * trainer.world_size)
        if not pl_module.writes_step_metrics():  # joins the step metrics the module writes
            return
        rates = self.throughput.compute()
        if "device/items_per_sec" in rates:  # once the window is full
            metrics = {"tokens_per_sec": rates["device/items_per_sec"] * trainer.world_size,
                       "flops_per_sec": rates["device/flops_per_sec"] * trainer.world_size, "elapsed_s": elapsed}
            if "device/mfu" in rates:
                metrics["mfu"] = rates["device/mfu"]
            pl_module.step_metrics.update(metrics)


class SampleText(L.Callback):
    """Generates text from fixed prompts: after every `every_n_validations`-th validation (0: never) and at the
    end of training, at most once per step. Prints each sample and appends it to `samples.jsonl` in the run
    folder; with a WandbLogger attached, also to a wandb table (step, prompt, sample) that grows over training.
    Under compile=true the model samples eagerly: each prompt length and the one-token steps would otherwise
    compile graphs of their own, 10-20 s each on a small CPU, for a few hundred tokens."""

    def __init__(self, prompts: list[str], max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 200, every_n_validations: int = 0, seed: int = 0, output_dir: str = "."):
        self.prompts, self.max_new_tokens, self.temperature, self.top_k = list(prompts), max_new_tokens, \
            temperature, top_k
        self.every_n_validations, self.seed = every_n_validations, seed
        self.path = Path(output_dir) / "samples.jsonl"
        self.validations = 0
        self.sampled_at: int | None = None  # the global step of the latest samples
        self.table = None  # the wandb.Table, created at the first samples logged to wandb

    def on_fit_start(self, trainer, pl_module) -> None:
        """Stop before training, not at the first sampling, on a prompt the tokenizer cannot encode."""
        tokenizer = trainer.datamodule.tokenizer
        for prompt in self.prompts:
            try:
                tokenizer.encode(prompt)
            except UserError as e:
                letters = (c for c in map(tokenizer.decode, ([i] for i in range(tokenizer.vocab_size))) if c.isalpha())
                example = next(letters, tokenizer.decode([0]))
                raise UserError(f"callbacks.samples.prompts: {prompt!r}: {e}; e.g. callbacks.samples.prompts="
                                f"[{example}], or callbacks.samples=null for no samples") from None

    def samples(self, trainer, pl_module) -> list[tuple[str, str]]:
        tokenizer = trainer.datamodule.tokenizer
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        out = []
        was_training = pl_module.training
        pl_module.eval()
        with run_eagerly():
            for prompt in self.prompts:
                idx = torch.tensor([tokenizer.encode(prompt)], device=pl_module.device)
                new = torch.cat(list(stream(pl_module.net, idx, self.max_new_tokens, temperature=self.temperature,
                                            top_k=self.top_k, generator=generator)), dim=1)
                out.append((prompt, tokenizer.decode(new[0].tolist())))
        pl_module.train(was_training)
        return out

    @rank_zero_only
    def write(self, trainer, pl_module) -> None:
        if trainer.global_step == self.sampled_at:  # e.g. the end of training right after a validation
            return
        self.sampled_at = trainer.global_step
        samples = self.samples(trainer, pl_module)
        with open(self.path, "a", encoding="utf-8") as f:
            for prompt, text in samples:
                f.write(json.dumps({"step": trainer.global_step, "prompt": prompt, "sample": text}) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self.log_table(logger, trainer.global_step, samples)
        # through the progress bar's console (rich's global one), which prints above the bar
        console = get_console() if isinstance(trainer.progress_bar_callback, RichProgressBar) else Console()
        for prompt, text in samples:
            console.print(Panel(Text(prompt + text), title=f"sample at step {trainer.global_step}"))

    def log_table(self, logger: WandbLogger, step: int, samples: list[tuple[str, str]]) -> None:
        """Append rows to the run's `samples` table; incremental logging uploads only the new rows each time
        and the dashboard shows them all."""
        import wandb

        if self.table is None:
            self.table = wandb.Table(columns=["step", "prompt", "sample"], log_mode="INCREMENTAL")
        for prompt, text in samples:
            self.table.add_data(step, prompt, text)
        logger.log_metrics({"samples": self.table}, step=step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.every_n_validations:
            return
        self.validations += 1
        if self.validations % self.every_n_validations == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)


class InterruptedCheckpoint(L.Callback):
    """Saves `dirpath/filename.ckpt` when training stops on an error or Ctrl-C after at least one step, to resume
    from with ckpt_path=. Lightning's OnExceptionCheckpoint does this too, but its presence makes every fit with
    ckpt_path=None resume from the folder's last.ckpt, so a run started in a used folder would not start fresh.

    Ctrl-C during training stops at the end of the optimizer step under way: one that lands inside it would
    leave weights that took the step beside a step count that did not, and the resumed run would train that
    batch twice. A second Ctrl-C stops at once and saves nothing (last.ckpt is the state to resume)."""

    def __init__(self, dirpath: str, filename: str = "interrupted"):
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.requested = self.forced = False
        self.step_at_batch_start = 0
        self.previous_handler = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.requested = self.forced = False
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous_handler = signal.signal(signal.SIGINT, self.on_ctrl_c)

    def on_ctrl_c(self, signum, frame) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nCtrl-C: stopping at the end of this step (Ctrl-C again stops at once)\n")

    def on_train_batch_start(self, trainer, *args) -> None:
        self.step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, *args) -> None:
        took_a_step = trainer.global_step > self.step_at_batch_start  # not inside accumulated micro-batches
        if took_a_step and trainer.strategy.reduce_boolean_decision(self.requested, all=False):  # all ranks
            raise KeyboardInterrupt  # Lightning's shutdown, as for a Ctrl-C, at a step's boundary

    def on_train_end(self, trainer, pl_module) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)
            self.previous_handler = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return
        if self.forced:
            last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
            rank_zero_info(f"stopped inside step {trainer.global_step + 1}, so that state was not saved"
                           + (f"; the same command with ckpt_path={last} resumes from the last checkpoint"
                              if last else ""))
            return
        trainer.save_checkpoint(self.path)  # the whole state: it resumes
        rank_zero_info(f"stopped at step {trainer.global_step}: its state is in {self.path}; the same command "
                       f"with ckpt_path={self.path} resumes it")
