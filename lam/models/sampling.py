"""Autoregressive sampling for any model with the `model(idx, state) -> (logits, state)` interface.

With `use_cache=True` each step feeds only the newest token and the state (KV cache, recurrent state);
without it every step recomputes the whole context. Both give the same tokens. Models with learned positions
(`max_context` set) see at most the last `max_context` tokens; past that each step recomputes a cropped window.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, vocab) logits -> (B, 1) token ids. temperature 0 picks the most likely token."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def stream(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, use_cache: bool = True,
           generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield (B, 1) new token ids one step at a time, continuing the (B, T) prompt `idx`."""
    limit = getattr(model, "max_context", None)
    seq, state = idx, None
    for _ in range(max_new_tokens):
        if use_cache and state is not None and (limit is None or seq.shape[1] <= limit):
            logits, state = model(seq[:, -1:], state)
        else:
            logits, state = model(seq if limit is None else seq[:, -limit:])
        nxt = sample_next(logits[:, -1], temperature, top_k, generator)
        seq = torch.cat((seq, nxt), dim=1)
        yield nxt


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by `max_new_tokens` sampled ids, (B, T + max_new_tokens)."""
    return torch.cat([idx, *stream(model, idx, max_new_tokens, **kwargs)], dim=1)
