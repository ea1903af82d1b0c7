"""Callbacks: a step-labelled progress bar, training throughput, sample generations and the checkpoint taken
when training is interrupted."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from lam.errors import UserError
from lam.models import stream


def run_eagerly():
    """A context in which torch.compile'd modules run their eager code (torch >= 2.6; elsewhere no change)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


class StepProgressBar(RichProgressBar):
    """Rich's progress bar, labelled "train" instead of Lightning's "Epoch 0/-2": LAM's training stream is
    endless and runs are measured in steps (the bar counts them up to trainer.max_steps)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"


class Throughput(L.Callback):
    """Logs `tokens_per_sec` (all ranks together, averaged over the last `window` steps) and `elapsed_s`,
    the wall time since training started."""

    def __init__(self, window: int = 10):
        self.window = window

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.mark = time.perf_counter()
        self.tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += batch[0].numel() * trainer.world_size
        if (batch_idx + 1) % self.window == 0:
            now = time.perf_counter()
            pl_module.log("tokens_per_sec", self.tokens / (now - self.mark), prog_bar=True)
            pl_module.log("elapsed_s", now - self.start)
            self.mark, self.tokens = now, 0


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
        for prompt in self.prompts:
            try:
                trainer.datamodule.tokenizer.encode(prompt)
            except UserError as e:
                raise UserError(f"callbacks.samples.prompts: {prompt!r}: {e}") from None

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
        console = Console()
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
    ckpt_path=None resume from the folder's last.ckpt, so a run started in a used folder would not start fresh."""

    def __init__(self, dirpath: str, filename: str = "interrupted"):
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.state.fn == TrainerFn.FITTING and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
