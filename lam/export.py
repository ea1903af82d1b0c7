"""python -m lam.export ckpt=<run>/checkpoints/best.ckpt out=shakespeare.lam

Writes a checkpoint's model as one model file (lam.serving.model_file): the weights (a LoRA run's adapters
folded in), the model config, the tokenizer and a training record. The file appears whole or not at all.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lam.config import command_line, config_dir, output_file, report_user_errors
from lam.data.corpora import corpus_name
from lam.data.tokenizer import describe
from lam.errors import UserError
from lam.generate import net_from_checkpoint
from lam.serving.model import Model
from lam.training.checkpoint import read_checkpoint


def validation_loss(checkpoint: dict) -> float | None:
    """The val/loss the checkpoint was saved with (its ModelCheckpoint's current score), if it has one."""
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and state.get("monitor") == "val/loss" and state.get("current_score") is not None:
            return float(state["current_score"])
    return None


def export(ckpt: str | Path, out: str | Path) -> Model:
    """The checkpoint's model, written to the model file `out`."""
    ckpt, out = Path(ckpt).expanduser(), output_file(out, "model.lam")
    if out.resolve() == ckpt.resolve():
        raise UserError(f"out={out} is the checkpoint itself; give another path")
    checkpoint = read_checkpoint(ckpt)
    net, tokenizer = net_from_checkpoint(checkpoint, ckpt)
    config = checkpoint["lam"]["config"]
    record = {"corpus": corpus_name(config.get("data", {})), "tokenizer": describe(tokenizer),
              "steps": int(checkpoint.get("global_step", 0)), "val_loss": validation_loss(checkpoint),
              "date": datetime.datetime.fromtimestamp(ckpt.stat().st_mtime, datetime.timezone.utc).isoformat(
                  timespec="seconds"), "checkpoint": ckpt.name}
    model = Model(net, tokenizer, config["model"], record)
    model.save(out)
    return model


@command_line()
@hydra.main(version_base="1.3", config_path=str(config_dir() / "apps"), config_name="export")
@report_user_errors
def main(cfg: DictConfig) -> None:
    print(f"reading {cfg.ckpt}")
    model = export(cfg.ckpt, cfg.out)
    size = Path(cfg.out).expanduser().stat().st_size
    print(f"wrote {cfg.out}: {model.summary()}, {size / 1e6:.2f} MB; use it: python -m lam.generate model={cfg.out}")


if __name__ == "__main__":
    main()
