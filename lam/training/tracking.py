"""What a run tells its loggers and its user: metrics at the optimizer steps done, one wandb run across
resumes, metrics.json, the wandb run's summary and end, and the few lines that close a run."""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def log_at_steps_done(trainer: L.Trainer) -> None:
    """Make every logger write metrics at trainer.global_step, the optimizer steps done. Lightning writes those
    of training and validation at the count of batches that stepped before the current one (9 for the
    metrics of the 10th step), and those of a validation after fit at the steps done (10)."""
    for logger in trainer.loggers:
        def log_metrics(metrics: dict, step: int | None = None, write=logger.log_metrics) -> None:
            write(metrics, step=trainer.global_step)

        logger.log_metrics = log_metrics



def keep_wandb_run(cfg: DictConfig, config: dict, resumed_config: dict | None) -> None:
    """Give the wandb logger (cfg, and the run's resolved `config` that checkpoints keep) the run id of the run
    resumed from, kept in its checkpoint's config, or a new one: a resumed run logs into the same wandb run
    (resume: allow)."""
    if "wandb" not in (config.get("logger") or {}) or config["logger"]["wandb"].get("id") is not None:
        return
    kept = ((resumed_config or {}).get("logger") or {}).get("wandb") or {}
    run_id = kept.get("id") or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    cfg.logger.wandb.id = config["logger"]["wandb"]["id"] = run_id



def write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # never a half-written file under the final name


@rank_zero_only
def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))



@rank_zero_only
def log_results(loggers: list, metrics: dict) -> None:
    """Once per run, at its end: tokens seen join every logger's hyperparameters, and metrics.json becomes the
    wandb run's summary (the columns of the dashboard's run table)."""
    for logger in loggers:
        logger.log_hyperparams({"tokens_seen": metrics["tokens_seen"]})
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(metrics)



@rank_zero_only
def finish_wandb(exit_code: int) -> None:
    """End this process's wandb run, if one was started: its files are complete, and it shows as failed when
    exit_code != 0. Without it, the next run of a multirun would log into this one."""
    wandb = sys.modules.get("wandb")  # never imported: no run
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)



@rank_zero_only
def log_summary(metrics: dict, output_dir: str, checkpoint) -> None:
    """What the run made, in a few lines: its losses, where it is, its speed and how to sample from it."""
    best = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
    last = checkpoint.last_model_path if checkpoint and checkpoint.last_model_path else None
    if metrics["val_loss"] is None:
        log.info("val loss: none (trainer.limit_val_batches=0: no validation)")
    else:
        best_loss = metrics["best_val_loss"]
        log.info(f"val loss: {metrics['val_loss']:.4f}" + (f", best {best_loss:.4f}" if best_loss is not None
                                                            else ""))
    log.info(f"run folder: {output_dir}")
    if best or last:
        log.info(f"{'best' if best else 'last'} checkpoint: {best or last}")
    if metrics["tokens_per_sec"] is not None:
        log.info(f"tokens/s: {metrics['tokens_per_sec']:,.0f} ({metrics['tokens_seen']:,} tokens in "
                 f"{metrics['wall_s']} s of fitting, validation and samples included)")
    if best or last:
        log.info(f"sample from it: python -m lam.generate ckpt={best or last}")
