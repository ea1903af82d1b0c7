"""The model file: one safetensors file holding a trained network, its config, its tokenizer and a record.

Layout (safetensors: an 8-byte header length, a JSON header, the tensor data):
- tensors: the network's state dict, each tensor stored once: a weight tied to another (the LM head, when it
  shares the token embedding) is left out and named in `tied`; building the network from its config ties it
  again. An untied head is stored like any other weight.
- metadata (strings): `format` ("lam-model"), `version`, `config` (the model config, attention included, as JSON
  in Hydra's `_target_` form), `tokenizer` (its state dict, JSON), `parameters` (the count), `record` (JSON:
  corpus, tokenizer, steps, val_loss, date), `tied` (JSON: {left-out name: stored name}) and `sha256`, a digest of
  the tensors (names, dtypes, shapes, bytes) and of every other metadata entry, verified on load.

Reading one runs nothing from it: safetensors holds no code, the config is built by `lam.serving.build` from
LAM's own classes only, the tokenizer from LAM's own list.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from lam.data.tokenizer import Tokenizer, load_tokenizer
from lam.errors import UserError
from lam.serving.build import build

FORMAT = "lam-model"
VERSION = 1
ENTRIES = ("format", "version", "config", "tokenizer", "parameters", "record", "tied", "sha256")
TORCH_ARCHIVE = b"PK\x03\x04"  # how a torch.save file begins (a zip archive): a checkpoint, not a model file


@dataclass
class ModelFile:
    """What a model file holds: the network (eval mode), its tokenizer, its model config and training record."""

    net: nn.Module
    tokenizer: Tokenizer
    config: dict
    record: dict


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, bytes) and the metadata but `sha256`."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps({k: v for k, v in sorted(metadata.items()) if k != "sha256"}).encode())
    return h.hexdigest()


def tied_names(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: the first name of the same tensor} for each entry of a state dict that repeats an earlier one."""
    tied, seen = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def save(path: str | Path, net: nn.Module, tokenizer: Tokenizer, config: dict, record: dict) -> Path:
    """Write the model file at `path` atomically (a temporary file beside it, then renamed): a reader sees the
    old file or the new one, never half of one."""
    path = Path(path).expanduser()
    state = net.state_dict()
    tied = tied_names(state)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items() if name not in tied}
    metadata = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config),
                "tokenizer": json.dumps(tokenizer.state_dict(), ensure_ascii=False),
                "parameters": str(sum(p.numel() for p in net.parameters())), "record": json.dumps(record),
                "tied": json.dumps(tied)}
    metadata["sha256"] = digest(tensors, metadata)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header; a UserError if the bytes are not such a file."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    try:
        header = json.loads(data[8:8 + n]) if 0 < n <= len(data) - 8 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        if data.startswith(TORCH_ARCHIVE):
            raise UserError(f"{path} is a checkpoint, not a model file: give it as ckpt={path}, or make a model "
                            f"file of it with python -m lam.export ckpt={path} out=<name>.lam")
        raise UserError(f"{path} is not a LAM model file (no safetensors header)")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or set(ENTRIES) - set(metadata):
        raise UserError(f"{path} is not a LAM model file (its metadata do not say format {FORMAT!r})")
    return metadata


def read(path: str | Path, device: str = "cpu") -> ModelFile:
    """The model file at `path`, its checksum verified; a UserError (one line) for a missing, truncated,
    changed or foreign file, or one that names classes that are not LAM's."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model file {path} is a folder" if path.is_dir() else f"model file {path} does not exist")
    data = path.read_bytes()
    metadata = read_metadata(data, path)
    if metadata["version"] != str(VERSION):
        raise UserError(f"{path} is a LAM model file of version {metadata['version']}; this LAM reads "
                        f"version {VERSION}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors' own error for a truncated or inconsistent file
        raise UserError(f"{path} is truncated or damaged ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if digest(tensors, metadata) != metadata["sha256"]:
        raise UserError(f"{path} has changed since it was written: its sha256 does not match its contents")
    try:
        config, record, tied = (json.loads(metadata[k]) for k in ("config", "record", "tied"))
        tokenizer = load_tokenizer(json.loads(metadata["tokenizer"]))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise UserError(f"{path} has unreadable metadata ({type(e).__name__}: {e})") from None
    if not isinstance(tied, dict) or not set(tied.values()) <= set(tensors):
        raise UserError(f"{path} names tied weights it does not hold")
    with torch.device("meta"):  # shapes without memory: a config that asks for huge tensors allocates nothing
        shapes = build(config, str(path), vocab_size=tokenizer.vocab_size).state_dict()
    for name, wanted in shapes.items():
        stored = tensors.get(tied.get(name, name))
        if stored is not None and stored.shape != wanted.shape:
            raise UserError(f"{path} does not match its model config: {name} is {tuple(stored.shape)} in the "
                            f"file, {tuple(wanted.shape)} by the config")
    net = build(config, str(path), vocab_size=tokenizer.vocab_size)
    if tied != (config_ties := tied_names(net.state_dict())):  # else loading one tensor would overwrite another
        raise UserError(f"{path} ties {tied or 'no weights'}, but its model config ties {config_ties or 'none'}")
    for name, stored in tied.items():
        tensors[name] = tensors[stored]
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        reason = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise UserError(f"{path} does not match its model config: {reason}") from None
    return ModelFile(net.to(device).eval(), tokenizer, config, record)
