"""python -m lam.generate ckpt=PATH prompt="ROMEO:" max_new_tokens=200

Rebuilds the model and tokenizer from the checkpoint alone and streams samples to the terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from lam.training.checkpoint import read_checkpoint
from lam.config import config_dir, report_user_errors
from lam.data.tokenizer import Tokenizer, check_same_tokenizer, load_tokenizer
from lam.errors import UserError
from lam.models import stream
from lam.models.lora import merge_lora_weights
from lam.serving.build import build


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Tokenizer]:
    """The trained network (in eval mode) and its tokenizer, from a checkpoint written by lam.train."""
    checkpoint = read_checkpoint(path, device)
    lam = checkpoint["lam"]
    tokenizer = load_tokenizer(lam["tokenizer"])
    net = build(lam["config"]["model"], str(path), vocab_size=tokenizer.vocab_size)
    weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    weights = merge_lora_weights(weights)  # a LoRA run's adapters, folded into the model's weights
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{path} does not match its model config: {str(e).splitlines()[1].strip()}") from None
    return net.to(device).eval(), tokenizer


def sample(net: torch.nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, out=sys.stdout,
           **kwargs) -> str:
    """Generate one continuation of `prompt`, writing the text to `out` as it grows; returns it whole."""
    device = next(net.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    if idx.shape[1] == 0:
        raise UserError("the prompt is empty: give at least one character, e.g. prompt='\\n'")
    ids: list[int] = []
    shown = ""
    out.write(prompt)
    for token in stream(net, idx, max_new_tokens, **kwargs):
        ids.append(token.item())
        text = tokenizer.decode(ids).rstrip("\ufffd")  # hold back a multi-byte character still incomplete
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write("\n")
    return tokenizer.decode(ids)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="generate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    net, tokenizer = load_checkpoint(cfg.ckpt, cfg.device)
    if cfg.tokenizer_file:
        check_same_tokenizer(cfg.tokenizer_file, tokenizer, f"checkpoint {cfg.ckpt}")
    generator = torch.Generator(cfg.device).manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        if i:
            print("-" * 40)
        sample(net, tokenizer, cfg.prompt, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
               use_cache=cfg.use_cache, generator=generator)


if __name__ == "__main__":
    main()
