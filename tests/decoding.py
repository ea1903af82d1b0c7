"""Shared by the cache tests: a decoder whose logits depend on the context, and the check that decoding with the
state (KV cache, recurrent state) gives at every step the logits of recomputing the whole context."""

from __future__ import annotations

import torch
from torch import nn

from lam.models import LAM


def context_sensitive_lam(attention, pos: str, vocab_size: int = 50, block_size: int = 64, **options) -> LAM:
    """A 2-layer LAM in float64 (`options`: LAM's other arguments) with an output head of its own and every
    matrix drawn at std 0.3. The GPT-2 init (std 0.02, head tied to the embedding) makes the attention's share of
    the residual stream so small that a greedy decoder repeats one token whatever its context, and a cache that
    never grows goes unnoticed."""
    torch.manual_seed(0)
    net = LAM(vocab_size=vocab_size, attention=attention, n_layer=2, n_head=2, n_embd=32, block_size=block_size,
              pos=pos, **options)
    net.lm_head.weight = nn.Parameter(torch.empty(vocab_size, 32))
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return net.double().eval()


@torch.no_grad()
def assert_cached_logits_match(net: nn.Module, prompt: int = 5, steps: int = 20) -> None:
    """Feed a random sequence: the prompt at once, then one token at a time with the state; each step's logits
    equal those of the whole prefix recomputed (float64: to 1e-7), and they pick many different tokens."""
    idx = torch.randint(net.vocab_size, (2, prompt + steps), generator=torch.Generator().manual_seed(1))
    logits, state = net(idx[:, :prompt])
    cached, recomputed = [logits[:, -1]], [logits[:, -1]]
    for t in range(prompt, prompt + steps):
        logits, state = net(idx[:, t:t + 1], state)
        cached.append(logits[:, -1])
        recomputed.append(net(idx[:, :t + 1])[0][:, -1])
    torch.testing.assert_close(torch.stack(cached, 1), torch.stack(recomputed, 1), rtol=1e-7, atol=1e-7)
    assert len(set(torch.stack(recomputed, 1).argmax(-1).flatten().tolist())) > 5  # the context matters
