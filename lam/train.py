"""python -m lam.train [group=choice ...] [key=value ...]

Composes conf/train.yaml with the overrides, builds the DataModule, the model and the Trainer from their
`_target_`s, trains, and writes metrics.json beside the run's .hydra/config.yaml. Returns the final validation
loss (what Optuna sweeps minimise).

Tracking: the loggers (logger=csv | tensorboard | wandb | many) receive the resolved config with the parameter
count and FLOPs per token (lam.models.flops) before training, and tokens seen after it; a wandb run also gets
metrics.json as its summary, and is finished on every way out, marked failed after an error or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lam.training.checkpoint import check_resumable
from lam.config import config_dir, report_user_errors
from lam.models.flops import flops_per_token
from lam.training.lightning_module import LanguageModel
from lam.sweep import needs_own_process, run_as_own_process


def instantiate_all(group: DictConfig | None) -> list:
    """Objects of a dict-of-configs group (callbacks, logger); an entry set to null is left out."""
    return [instantiate(c) for c in (group or {}).values() if c is not None]


@rank_zero_only
def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # never a half-written file under the final name


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


def validate_the_end(trainer: L.Trainer, model: LanguageModel, datamodule) -> None:
    """Validate the last step if the schedule did not, and let that loss count for best.ckpt (ModelCheckpoint
    only sees validations inside fit)."""
    if model.validated_at == trainer.global_step:
        return
    trainer.validate(model, datamodule=datamodule, verbose=False)
    checkpoint, loss = trainer.checkpoint_callback, trainer.callback_metrics["val/loss"]
    if checkpoint and checkpoint.monitor == "val/loss" and checkpoint.mode == "min" \
            and (checkpoint.best_model_score is None or loss < checkpoint.best_model_score):
        checkpoint.best_model_path, checkpoint.best_model_score = checkpoint.format_checkpoint_name({}), loss
        trainer.save_checkpoint(checkpoint.best_model_path)


def train(cfg: DictConfig) -> float:
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    size = {"params": sum(p.numel() for p in net.parameters()),  # counted before torch.compile wraps the net
            "flops_per_token": flops_per_token(net, datamodule.block_size)}
    config = OmegaConf.to_container(cfg, resolve=True)
    model = LanguageModel(net, optimizer=instantiate(cfg.optim), scheduler=instantiate(cfg.scheduler),
                          compile=cfg.compile, config=config)
    trainer = instantiate(cfg.trainer, callbacks=instantiate_all(cfg.callbacks),
                          logger=instantiate_all(cfg.logger) or False)
    if needs_own_process(trainer):  # DDP inside a multirun (see lam.sweep)
        return run_as_own_process()

    if cfg.ckpt_path:
        check_resumable(cfg.ckpt_path, model)
    try:
        for logger in trainer.loggers:  # once per run: the resolved config, the model's size and cost
            logger.log_hyperparams({**config, **size})
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        wall_s = time.perf_counter() - start
        validate_the_end(trainer, model, datamodule)

        tokens = trainer.global_step * trainer.accumulate_grad_batches * trainer.world_size \
            * datamodule.batch_size * datamodule.block_size
        checkpoint = trainer.checkpoint_callback
        metrics = {
            "val_loss": float(trainer.callback_metrics["val/loss"]),
            "best_val_loss": float(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score
            is not None else None,
            "steps": trainer.global_step,
            "tokens_seen": tokens,
            **size,
            "wall_s": round(wall_s, 2),
            "tokens_per_sec": round(tokens / wall_s, 1) if cfg.ckpt_path is None else None,
            "interrupted": trainer.interrupted,
        }
        write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        log_results(trainer.loggers, metrics)
    except BaseException:  # an error or Ctrl-C (Lightning's SystemExit): the wandb run ends as failed
        finish_wandb(exit_code=1)
        raise
    finish_wandb(exit_code=0)
    return metrics["val_loss"]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
