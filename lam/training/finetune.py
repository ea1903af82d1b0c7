"""Fine-tuning: a start from a trained model (init_from=) and LoRA adapters (lora=).

A start takes three things from its file: the model's architecture (its config, which overrides the run's),
its tokenizer (the run's data is encoded with it, so that ids keep their meaning) and its weights; the run then
trains from step 0 with a new optimizer and schedule. The file is a model file (lam.export) or a checkpoint of
lam.train; a LoRA run's adapters are folded into the weights on reading, so any run can be the start of another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lam.data.tokenizer import Tokenizer, load_tokenizer
from lam.errors import UserError
from lam.models.lora import add_lora, merge_lora_weights
from lam.serving import model_file
from lam.training.checkpoint import is_checkpoint, read_checkpoint
from lam.training.runs import flatten


@dataclass
class Start:
    """What a fine-tune starts from: `model` is the model's config as the file has it (resolved), `weights` the
    state dict of that model, without adapters."""

    path: Path
    model: dict
    tokenizer: Tokenizer
    weights: dict[str, torch.Tensor]

    def load_into(self, net: nn.Module) -> None:
        """Copy the file's weights into `net`, a model built from `self.model`."""
        net.load_state_dict(self.weights)


def read_start(path: str | Path) -> Start:
    """The model, tokenizer and weights of a model file or a checkpoint of lam.train; a UserError if it is
    neither."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"init_from={path} does not exist: give a model file (lam.export) or a checkpoint of "
                        "lam.train")
    if path.is_file() and not is_checkpoint(path):
        found = model_file.read(path)
        return Start(path, found.config, found.tokenizer, found.net.state_dict())
    checkpoint = read_checkpoint(path)
    lam = checkpoint["lam"]
    weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    return Start(path, lam["config"]["model"], load_tokenizer(lam["tokenizer"]), merge_lora_weights(weights))


def model_key(key: str) -> str | None:
    """What a config key set on the command line sets of the model: "" for `model` (the whole model), `n_layer`
    for `model.n_layer`, `attention` or `attention.x` for the attention group; None for a key outside it."""
    if key == "model":
        return ""
    if key.startswith("model."):
        return key.removeprefix("model.")
    if key == "attention" or key.startswith("attention."):
        return key
    return None


def check_architecture(start: Start, model: dict, overrides: dict[str, str]) -> None:
    """A UserError if an override asks for a model other than the file's: the architecture comes from it.
    `model` is the run's resolved model config; `overrides` maps each command-line override to the config key
    it sets. The model's block_size follows the data unless set, so a whole-model override is not held to it."""
    ours, theirs = flatten(model), flatten(start.model)
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    for override, key in overrides.items():
        prefix = model_key(key)
        if prefix is None:
            continue
        for name in differ:
            if (not prefix and name != "block_size") or name == prefix or name.startswith(f"{prefix}."):
                raise UserError(f"{override} is refused: init_from={start.path} fixes the architecture "
                                f"(model.{name} is {theirs.get(name)!r} there); drop the override")


def context_for(start: Start, net: nn.Module, block_size: int, set_on_command_line: bool) -> int:
    """The data's window length for fine-tuning `net`, the model of `start`: `block_size` where its learned
    positions reach that far, else as far as they reach, unless the command line asked for `block_size` (then
    a UserError: the run cannot be what it says)."""
    if net.max_context is None or block_size <= net.max_context:
        return block_size
    if set_on_command_line:
        raise UserError(f"data.block_size={block_size} is longer than the {net.max_context} positions the model "
                        f"of init_from={start.path} has learned; use data.block_size<={net.max_context}")
    return net.max_context


def adapt(net: nn.Module, lora: dict) -> list[str]:
    """Freeze `net` and put LoRA adapters on it as the lora group says; the adapted layers' names."""
    try:
        return add_lora(net, **lora)
    except ValueError as e:
        raise UserError(str(e)) from None


def parameter_counts(net: nn.Module) -> dict[str, int]:
    """All parameters of `net` (a tied weight once) and those that train."""
    return {"params": sum(p.numel() for p in net.parameters()),
            "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad)}
