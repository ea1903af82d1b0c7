"""python -m lam.generate model=x.lam | ckpt=PATH prompt="ROMEO:" max_new_tokens=200

Rebuilds the model and tokenizer from the model file or checkpoint alone and streams samples to the terminal;
`num_samples` > 1 are sampled as one batch and printed when done.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from lam.config import check_device, command_line, config_dir, report_user_errors, set_threads
from lam.data.corpora import corpus_name
from lam.data.tokenizer import Tokenizer, check_same_tokenizer, load_tokenizer
from lam.errors import UserError
from lam.models import stream
from lam.models.lora import merge_lora_weights
from lam.models.sampling import stream_text
from lam.serving.build import build
from lam.serving.model import Model, check_sampling, check_switches, seeded_generator, stop_list
from lam.training.checkpoint import read_checkpoint


def net_from_checkpoint(checkpoint: dict, path: str | Path) -> tuple[torch.nn.Module, Tokenizer]:
    """The trained network (in eval mode, on the CPU) and its tokenizer, from a checkpoint read by
    `read_checkpoint`."""
    lam = checkpoint["lam"]
    tokenizer = load_tokenizer(lam["tokenizer"])
    net = build(lam["config"]["model"], str(path), vocab_size=tokenizer.vocab_size)
    weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    weights = merge_lora_weights(weights)  # a LoRA run's adapters, folded into the model's weights
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        reason = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise UserError(f"{path} does not match its model config: {reason}") from None
    return net.eval(), tokenizer


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Tokenizer]:
    """The trained network (in eval mode) and its tokenizer, from a checkpoint written by lam.train."""
    net, tokenizer = net_from_checkpoint(read_checkpoint(path, device), path)
    return net.to(device), tokenizer


def load_model(model: str | None, ckpt: str | None, device: str = "cpu") -> tuple[Model, str]:
    """The `Model` of a model file (model=) or a checkpoint (ckpt=), exactly one of them, and what it came from
    ("model file x.lam", "checkpoint y.ckpt"); a checkpoint's record names the corpus it was trained on."""
    if (model is None) == (ckpt is None):
        raise UserError("give the model to use: model=<file>.lam (from lam.export) or ckpt=<run>/checkpoints/"
                        "<name>.ckpt, one of them")
    check_device(device)
    if model is not None:
        return Model.load(model, device), f"model file {model}"
    checkpoint = read_checkpoint(ckpt, device)
    net, tokenizer = net_from_checkpoint(checkpoint, ckpt)
    config = checkpoint["lam"]["config"]
    record = {"corpus": corpus_name(config.get("data", {}))}  # what a model file's record says of it
    return Model(net.to(device), tokenizer, config["model"], record), f"checkpoint {ckpt}"


def command_line_text(text: str) -> str:
    """A text as typed on a command line: \\n and \\t in it mean newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def command_line_stops(stop) -> list[str]:
    """Stop strings as typed on a command line (a string or a list), read by `command_line_text`."""
    return [command_line_text(s) for s in stop_list(stop)]


def sample(net: torch.nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, out=sys.stdout,
           stop: list[str] | None = None, **kwargs) -> str:
    """Generate one continuation of `prompt`, writing the text to `out` as it grows and ending before a stop
    string; returns it whole."""
    device = next(net.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    if idx.shape[1] == 0:
        raise UserError("the prompt is empty: give at least one character, e.g. prompt='\\n'")
    out.write(prompt)
    pieces = []
    tokens = (t.item() for t in stream(net, idx, max_new_tokens, **kwargs))
    for piece in stream_text(tokens, tokenizer.decode, stop or []):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)


def sample_batch(net: torch.nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, num_samples: int,
                 stop: list[str] | None = None, **kwargs) -> list[str]:
    """`num_samples` continuations of `prompt`, sampled as one batch, each ending before a stop string."""
    device = next(net.parameters()).device
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty: give at least one character, e.g. prompt='\\n'")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    steps = [t for t in stream(net, idx, max_new_tokens, **kwargs)]
    rows = torch.cat(steps, dim=1).tolist() if steps else [[] for _ in range(num_samples)]
    return ["".join(stream_text(iter(row), tokenizer.decode, stop or [])) for row in rows]


@command_line("prompt")
@hydra.main(version_base="1.3", config_path=str(config_dir() / "apps"), config_name="generate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                   frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty)
    check_switches(use_cache=cfg.use_cache, compile=cfg.compile, context_shift=cfg.context_shift)
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 1:
        raise UserError(f"num_samples must be an integer >= 1, got {cfg.num_samples!r}")
    set_threads(cfg.threads)
    check_device(cfg.device)
    generator = seeded_generator(cfg.device, cfg.seed)
    model, source = load_model(cfg.model, cfg.ckpt, cfg.device)
    if cfg.tokenizer_file:
        check_same_tokenizer(cfg.tokenizer_file, model.tokenizer, source)
    options = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, use_cache=cfg.use_cache,
                   compile=cfg.compile, context_shift=cfg.context_shift, generator=generator,
                   frequency_penalty=cfg.frequency_penalty, presence_penalty=cfg.presence_penalty,
                   stop=command_line_stops(cfg.stop))
    prompt = command_line_text(cfg.prompt)
    if cfg.num_samples == 1:
        sample(model.net, model.tokenizer, prompt, cfg.max_new_tokens, **options)
        return
    for i, text in enumerate(sample_batch(model.net, model.tokenizer, prompt, cfg.max_new_tokens,
                                          cfg.num_samples, **options)):
        if i:
            print("-" * 40)
        print(prompt + text)


if __name__ == "__main__":
    main()
