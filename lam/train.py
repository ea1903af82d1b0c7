"""python -m lam.train [group=choice ...] [key=value ...]

Composes conf/train.yaml with the overrides, builds the DataModule, the model and the Trainer from their
`_target_`s, trains, and writes metrics.json beside the run's .hydra/config.yaml. Returns the final validation
loss (what Optuna sweeps minimise).

Tracking: the loggers (logger=csv | tensorboard | wandb | many) receive the resolved config with the parameter
count and FLOPs per token (lam.models.flops) before training, and tokens seen after it; a wandb run also gets
metrics.json as its summary, and is finished on every way out, marked failed after an error or Ctrl-C. Every
logger writes metrics at the optimizer steps done (trainer.global_step), the step samples.jsonl and the
progress bar show. A resumed wandb run continues the wandb run of the checkpoint's run (its id is kept in the
checkpoint's config).

From the command line the run's log goes to the terminal and to train.log in the run folder, Lightning's
messages included, and a failed run's error or traceback too; the run ends with a summary of what it made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lam.config import check_device, command_line, config_dir, override_key, report_user_errors, set_threads, \
    trained_choices, user_error
from lam.errors import UserError
from lam.models.flops import flops_per_token
from lam.sweep import needs_own_process, run_as_own_process
from lam.training.checkpoint import check_resumable
from lam.training.finetune import Start, adapt, check_architecture, context_for, parameter_counts, read_start
from lam.training.lightning_module import LanguageModel
from lam.training.precision import AUTO, PRECISIONS, cpu_precision, emulated_bf16, measured_precision
from lam.training.run_log import log_to_the_run
from lam.training.tracking import finish_wandb, keep_wandb_run, log_at_steps_done, log_results, log_summary, \
    write_json, write_text

log = logging.getLogger(__name__)


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


# values that cannot work, checked before anything is built: (key, test, what is allowed)
VALUE_CHECKS = [
    ("optim.lr", lambda v: is_number(v) and v > 0, "must be > 0 (the learning rate)"),
    ("optim.weight_decay", lambda v: is_number(v) and v >= 0, "must be >= 0"),
    ("data.batch_size", is_positive_int, "must be an integer >= 1 (windows per batch)"),
    ("data.block_size", is_positive_int, "must be an integer >= 1 (tokens per window)"),
    ("data.eval_batches", is_positive_int, "must be an integer >= 1 (validation batches)"),
    ("trainer.max_steps", is_positive_int, "must be an integer >= 1 (the training stream has no end)"),
    ("trainer.accumulate_grad_batches", is_positive_int, "must be an integer >= 1"),
    ("trainer.val_check_interval", is_positive_int, "must be an integer >= 1 (training steps between validations)"),
    ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer"),
    ("tokenizer.vocab_size", is_positive_int, "must be an integer (tokens in the vocabulary)"),
    ("data.num_workers", lambda v: is_positive_int(v) or v == 0, "must be an integer >= 0 (0: batches are made in "
     "the training process)"),
    ("scheduler.warmup_steps", lambda v: is_positive_int(v) or v == 0, "must be an integer >= 0"),
    ("scheduler.min_lr_ratio", lambda v: is_number(v) and 0 <= v <= 1, "must be between 0 and 1 (of optim.lr)"),
    ("scheduler.decay_fraction", lambda v: is_number(v) and 0 < v <= 1, "must be in (0, 1] (the share of the run "
     "over which lr decays)"),
    ("trainer.gradient_clip_val", lambda v: is_number(v) and v >= 0, "must be >= 0, or null for no clipping"),
    ("compile", lambda v: isinstance(v, bool), "must be true or false"),
    ("trainer.enable_progress_bar", lambda v: isinstance(v, bool), "must be true or false"),
    ("trainer.accelerator", lambda v: v in ("cpu", "gpu", "cuda", "mps", "tpu", "auto"), "must be cpu, gpu, cuda, "
     "mps, tpu or auto"),
    ("trainer.precision", lambda v: str(v) in PRECISIONS, "must be auto (the CPU trainer's default), 32-true, "
     "bf16-mixed, 16-mixed (GPUs), bf16-true, 16-true or 64-true"),
    ("optim.betas", lambda v: isinstance(v, Sequence) and len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v),
     "must be two numbers in [0, 1), e.g. [0.9,0.99]"),
]


def check_values(cfg: DictConfig) -> None:
    """A UserError naming the first key of VALUE_CHECKS whose value cannot work."""
    for key, allowed, rule in VALUE_CHECKS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not allowed(value):
            raise UserError(f"{key}={value} {rule}")
    model, windows = cfg.get("model") or {}, cfg.data.get("block_size")
    if (model.get("pos") == "learned" and is_positive_int(model.get("block_size")) and is_positive_int(windows)
            and model.block_size < windows and not cfg.get("init_from")):  # init_from's windows are fitted
        raise UserError(f"model.block_size={model.block_size} is shorter than data.block_size={windows}: learned "
                        f"positions reach model.block_size tokens; set data.block_size<={model.block_size} "
                        "(model.block_size follows it) or model.pos=rope")
    accelerator = cfg.trainer.get("accelerator")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    if cfg.trainer.get("precision") == AUTO and not on_cpu:
        raise UserError(f"trainer.precision=auto is measured on the CPU (trainer=cpu), not with "
                        f"trainer.accelerator={accelerator}: name a precision, e.g. trainer.precision=bf16-mixed")
    if accelerator in ("gpu", "cuda", "mps"):
        check_device("mps" if accelerator == "mps" else "cuda", f"trainer.accelerator={accelerator}", "trainer=cpu")


def built(key: str, cfg: DictConfig, **kwargs):
    """instantiate(cfg, **kwargs); a value its target refuses (a ValueError, or Lightning's
    MisconfigurationException) is a UserError naming `key`."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, MisconfigurationException)):
            raise UserError(f"{key}: {e.__cause__}") from None
        raise


def build_net(model: DictConfig, vocab_size: int) -> torch.nn.Module:
    """The model of the config; a value the model or its attention refuses is a UserError naming it."""
    return built("model", model, vocab_size=vocab_size)


def choose_precision(cfg: DictConfig, net: torch.nn.Module, datamodule) -> None:
    """Replace trainer.precision=auto by what measured_precision picks for this model; the run's config,
    checkpoints and metrics then name the precision it trained at. Several processes (DDP) take the CPU's
    choice, unmeasured, so that every rank trains alike."""
    if cfg.trainer.get("devices", 1) == 1 and cfg.trainer.get("num_nodes", 1) == 1:
        precision, why = measured_precision(net, datamodule.batch_size, datamodule.block_size, datamodule.vocab_size)
    else:
        precision, why = cpu_precision(), "several processes: the CPU's flags decide"
    log.info(f"trainer.precision=auto: {precision} ({why})")
    with open_dict(cfg):
        cfg.trainer.precision = precision


def instantiate_all(name: str, group: DictConfig | None) -> list:
    """Objects of the dict-of-configs group `name` (callbacks, logger); an entry set to null is left out."""
    return [built(f"{name}.{key}", c) for key, c in (group or {}).items() if c is not None]


def callbacks_for(trainer_cfg: DictConfig, callbacks: list) -> list:
    """The callbacks, less the progress bar under trainer.enable_progress_bar=false and the model summary under
    trainer.enable_model_summary=false (Lightning refuses a bar it is told not to show)."""
    off = tuple(kind for switch, kind in (("enable_progress_bar", ProgressBar), ("enable_model_summary", ModelSummary))
                if trainer_cfg.get(switch) is False)
    return [c for c in callbacks if not isinstance(c, off)] if off else callbacks


def validate_the_end(trainer: L.Trainer, model: LanguageModel, datamodule) -> None:
    """Validate the last step if the schedule did not, and let that loss count for best.ckpt and last.ckpt
    (ModelCheckpoint only sees validations inside fit)."""
    if model.validated_at == trainer.global_step or not trainer.enable_validation:
        return
    trainer.validate(model, datamodule=datamodule, verbose=False)
    checkpoint, loss = trainer.checkpoint_callback, trainer.callback_metrics["val/loss"]
    if checkpoint is None:
        return
    if checkpoint.monitor == "val/loss":
        checkpoint.current_score = loss  # the score the files below are saved with (lam.export records it)
    if checkpoint.monitor == "val/loss" and checkpoint.mode == "min" \
            and (checkpoint.best_model_score is None or loss < checkpoint.best_model_score):
        checkpoint.best_model_path, checkpoint.best_model_score = checkpoint.format_checkpoint_name({}), loss
        trainer.save_checkpoint(checkpoint.best_model_path, weights_only=checkpoint.save_weights_only)
    if checkpoint.save_last:
        checkpoint.last_model_path = checkpoint.format_checkpoint_name({}, checkpoint.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(checkpoint.last_model_path, weights_only=checkpoint.save_weights_only)


@rank_zero_only
def save_run_config(cfg: DictConfig) -> None:
    """Write `cfg` over the run's .hydra/config.yaml, which Hydra wrote as composed before the run changed it
    (init_from='s model in place of the composed one), so that the folder says what was trained."""
    subdir = HydraConfig.get().output_subdir
    if subdir is None:  # hydra.output_subdir=null: no .hydra folder
        return
    path = Path(cfg.paths.output_dir) / subdir / "config.yaml"
    if not path.is_file():
        return
    write_text(path, OmegaConf.to_yaml(cfg))


def start_from(cfg: DictConfig, overrides: dict[str, str]) -> Start:
    """init_from's model, whose architecture replaces cfg.model; a UserError if the command line's `overrides`
    (each with the config key it sets) ask for another. With ckpt_path= too (the fine-tune's own command,
    resumed), the checkpoint's weights, optimizer and step then replace the file's."""
    start = read_start(cfg.init_from)
    check_architecture(start, OmegaConf.to_container(cfg.model, resolve=True), overrides)
    with open_dict(cfg):
        if "attention" in start.model and "attention" in cfg:  # the attention group is the file's too
            cfg.attention = start.model["attention"]
            cfg.model = {**start.model, "attention": "${attention}"}
        else:
            cfg.model = start.model
    return start


def train(cfg: DictConfig) -> float | None:
    """Train as `cfg` says; the final validation loss (None without validation)."""
    check_values(cfg)
    set_threads(cfg.get("threads"))
    L.seed_everything(cfg.seed, workers=True)
    fine_tune = bool(cfg.get("init_from"))
    overrides = {o: override_key(o) for o in HydraConfig.get().overrides.task} if fine_tune else {}
    start = start_from(cfg, overrides) if fine_tune else None
    datamodule = instantiate(cfg.data, **({"tokenizer": start.tokenizer} if start else {}))
    net = build_net(cfg.model, datamodule.vocab_size)
    if start:
        block_size = context_for(start, net, datamodule.block_size, "data.block_size" in overrides.values())
        if block_size != datamodule.block_size:  # the windows the file's learned positions reach
            log.info(f"data.block_size={block_size}: as far as the positions of init_from={cfg.init_from} reach")
            with open_dict(cfg):
                cfg.data.block_size = block_size
            datamodule = instantiate(cfg.data, tokenizer=start.tokenizer)
        start.load_into(net)
        save_run_config(cfg)
    adapted = adapt(net, OmegaConf.to_container(cfg.lora, resolve=True)) if cfg.get("lora") else []
    size = {**parameter_counts(net),  # counted before torch.compile wraps the net
            "flops_per_token": flops_per_token(net, datamodule.block_size)}
    log.info(f"parameters: {size['params']:,}" + (f", of which {size['trainable_params']:,} train (LoRA adapters "
                                                  f"on {len(adapted)} layers)" if adapted else ""))
    if cfg.trainer.get("precision") == AUTO:
        choose_precision(cfg, net, datamodule)
    config = OmegaConf.to_container(cfg, resolve=True)
    model = LanguageModel(net, optimizer=instantiate(cfg.optim), scheduler=instantiate(cfg.scheduler),
                          compile=cfg.compile, config=config)
    keep_wandb_run(cfg, config, check_resumable(cfg.ckpt_path, model) if cfg.ckpt_path else None)
    trainer = built("trainer", cfg.trainer,
                    callbacks=callbacks_for(cfg.trainer, instantiate_all("callbacks", cfg.callbacks)),
                    logger=instantiate_all("logger", cfg.logger) or False)
    if needs_own_process(trainer):  # DDP inside a multirun (see lam.sweep)
        return run_as_own_process()
    log_at_steps_done(trainer)
    log.info(f"precision: {trainer.precision}")
    if slow := emulated_bf16(trainer.precision, trainer.strategy.root_device.type):
        log.warning(slow)

    try:
        for logger in trainer.loggers:  # once per run: the resolved config, the model's size and cost
            logger.log_hyperparams({**config, **size})
        began = time.perf_counter()
        # a resumed checkpoint is unpickled as tensors and plain values only: it runs no code
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        wall_s = time.perf_counter() - began
        validate_the_end(trainer, model, datamodule)

        tokens = trainer.global_step * trainer.accumulate_grad_batches * trainer.world_size \
            * datamodule.batch_size * datamodule.block_size
        checkpoint = trainer.checkpoint_callback
        val_loss = trainer.callback_metrics.get("val/loss")
        metrics = {
            "val_loss": float(val_loss) if val_loss is not None else None,
            "best_val_loss": float(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score
            is not None else None,
            "steps": trainer.global_step,
            "precision": trainer.precision,  # older configs say ${lam.cpu_precision:}: the CPU's choice
            "tokens_seen": tokens,
            **size,
            "wall_s": round(wall_s, 2),
            "tokens_per_sec": round(tokens / wall_s, 1) if cfg.ckpt_path is None else None,
            "interrupted": trainer.interrupted,
            "trained": trained_choices(cfg),  # init_from's model, where it replaced the composed one
        }
        write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        log_results(trainer.loggers, metrics)
        log_summary(metrics, cfg.paths.output_dir, checkpoint)
    except BaseException:  # an error or Ctrl-C (Lightning's SystemExit): the wandb run ends as failed
        finish_wandb(exit_code=1)
        raise
    finish_wandb(exit_code=0)
    return metrics["val_loss"]


def log_failure_to_file(exc: BaseException) -> None:
    """Write why the run ended to train.log (the terminal shows it already): the one line of a user's error,
    else the traceback."""
    if (error := user_error(exc)) is not None:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, f"error: {error}", None, None)
    elif isinstance(exc, (KeyboardInterrupt, SystemExit)):
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "run interrupted", None, None)
    else:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed", None,
                                (type(exc), exc, exc.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@command_line(corpus=True)
@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    log_to_the_run()
    try:
        return train(cfg)
    except BaseException as e:
        log_failure_to_file(e)
        raise


if __name__ == "__main__":
    main()
