"""Reading the checkpoints lam.train writes, with one-line errors for paths that are not one."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from lam.errors import UserError
from lam.serving.build import check_targets
from lam.serving.model_file import TORCH_ARCHIVE


def is_checkpoint(path: Path) -> bool:
    """Whether the file is a torch.save zip archive (a checkpoint) rather than a model file (safetensors)."""
    with open(path, "rb") as f:
        return f.read(len(TORCH_ARCHIVE)) == TORCH_ARCHIVE


def is_model_file(path: Path) -> bool:
    """Whether the file begins as a safetensors file (a model file): 8 bytes of header length, then JSON, and
    not as a checkpoint's zip archive."""
    with open(path, "rb") as f:
        head = f.read(9)
    return not head.startswith(TORCH_ARCHIVE) and head[8:9] == b"{"


def read_checkpoint(path: str | Path, device: str = "cpu") -> dict:
    """The checkpoint's contents; a UserError if the file is missing, unreadable, not written by lam.train, or
    holds anything but tensors and plain values (weights_only: unpickling it runs no code) or a model config
    naming a class that is not LAM's."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted(path.rglob("*.ckpt"))
        raise UserError(f"checkpoint {path} is a folder; " + (f"give a file in it, e.g. {found[0]}" if found else
                                                              "it holds no .ckpt file"))
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if is_model_file(path):
        raise UserError(f"{path} is a model file, not a checkpoint: lam.generate, lam.eval and lam.chat take it as "
                        f"model={path}, lam.train as init_from={path}")
    try:  # memory-mapped: tensors are read when used, so a check that reads shapes only reads little
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: its message names the global
        refused = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "an object")
        raise UserError(f"{path} holds more than tensors and plain values ({refused}); it is not loaded, since "
                        "unpickling it could run code") from None
    except Exception as e:  # torch.load raises many kinds for a file that is not a checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first})") from None
    lam = checkpoint.get("lam") if isinstance(checkpoint, dict) else None
    if not isinstance(lam, dict) or "tokenizer" not in lam or "model" not in lam.get("config", {}):
        raise UserError(f"{path} is not a LAM checkpoint (it holds no model config and tokenizer)")
    check_targets(lam["config"]["model"], str(path))
    return checkpoint


def differing_keys(there: dict, here: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value there, value here) wherever two nested configs differ; a key one of them lacks is
    None there. Where the `_target_`s differ, that is the one difference named: the other keys belong to
    other classes."""
    if there.get("_target_") != here.get("_target_"):
        return [(f"{prefix}_target_", there.get("_target_"), here.get("_target_"))]
    out = []
    for key in dict.fromkeys([*there, *here]):
        a, b = there.get(key), here.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def check_resumable(path: str | Path, model: torch.nn.Module) -> dict:
    """The config of the run that wrote the checkpoint at `path`; a UserError unless that run's model config
    (attention included) is `model.config`'s and its weights have `model`'s names and shapes."""
    checkpoint = read_checkpoint(path)
    config = checkpoint["lam"]["config"]
    differ = differing_keys(config["model"], model.config.get("model", {}), "model.")
    if differ:
        keys = ", ".join(f"{key} is {a} there and {b} here" for key, a, b in differ)
        raise UserError(f"ckpt_path={path} was written for another model: {keys}; resume with the config of the "
                        f"run that wrote it")
    weights = checkpoint["state_dict"]
    for name, tensor in model.state_dict().items():
        if name not in weights or weights[name].shape != tensor.shape:
            there = f"is {tuple(weights[name].shape)} there" if name in weights else "is missing there"
            raise UserError(f"ckpt_path={path} does not match this model: {name} {there} and "
                            f"{tuple(tensor.shape)} here; resume with the config of the run that wrote it")
    return config
