"""FLOPs per token of a model, counting what the attention itself costs at a given context length.

A multiply-add is 2 FLOPs. Per token, the forward pass costs

    2 x (weights of every linear layer, the head's once, tied or not)  +  the token mixing of every attention layer

and training costs 3x that (the backward pass does about twice the forward's work; Kaplan et al. 2020: 6N).
Embedding lookups, norms, activations and the softmax's exponentials are not counted. Each mechanism says
what its token mixing costs in its own `mixing_flops(context)`: the work that is needed, whatever a kernel
computes besides (masked pairs, padding). Per token, over a window of T tokens:
- softmax:   4·d·(T+1)/2          the t-th token sees t keys: quadratic in T per sequence
- window:    4·d·mean(min(t, W))  at most W keys
- linear family (linear, retention, gated), chunks of C tokens, F feature channels per head:
             2·H·(F+D)·mean(keys in the chunk) + 4·H·F·D   linear in T
"""

from __future__ import annotations

from torch import nn

from lam.models.attention import Attention


def forward_flops_per_token(net: nn.Module, context: int) -> float:
    """Forward FLOPs per token of `net` over windows of `context` tokens."""
    linear = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear))
    mixing = sum(m.mixing_flops(context) for m in net.modules() if isinstance(m, Attention))
    return 2 * linear + mixing


def flops_per_token(net: nn.Module, context: int) -> float:
    """Training FLOPs (forward and backward) per token of `net` over windows of `context` tokens."""
    return 3 * forward_flops_per_token(net, context)
