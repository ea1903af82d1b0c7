"""FLOPs per token of a model, counting what the attention itself costs at a given context length.

A multiply-add is 2 FLOPs. Per token, the forward pass costs

    2 x (weights of every linear layer, the tied head once)  +  the token mixing of every attention layer

and training costs 3x that (the backward pass does about twice the forward's work; Kaplan et al. 2020: 6N).
Embedding lookups, norms, activations and the softmax's exponentials are not counted.

Token mixing counts the work that is needed, whatever a kernel computes besides (masked pairs, padding): a
query-key pair costs 2D for the score plus 2D for the weighted value, per head of D channels, so 4·d_model
over all heads. Per token, averaged over a window of T tokens:
- softmax:   4·d·(T+1)/2                       the t-th token sees t keys: quadratic in T per sequence
- window:    4·d·mean(min(t, W))               at most W keys
- linear family (linear, retention, gated), chunks of C tokens, feature dimension F per head:
             2·H·(F+D)·mean(keys in the chunk) + 4·H·F·D     pairs inside a chunk, plus reading q·S and
                                                              adding k vᵀ to the H states of F x D: linear in T
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from lam.models.attention import (Attention, GatedLinearAttention, LinearAttention, Retention,
                                  SlidingWindowAttention, SoftmaxAttention)

CHUNKED = (LinearAttention, Retention, GatedLinearAttention)


def mean_keys(context: int, keys_seen: Callable[[int], int]) -> float:
    """Keys a query attends to, averaged over the positions t = 0 .. context-1 of a training window."""
    return sum(keys_seen(t) for t in range(context)) / context


def feature_dim(attn: Attention) -> int:
    """Channels per head of queries and keys after the feature map (the head size when there is none)."""
    phi = getattr(attn, "phi", None)
    return attn.head_dim if phi is None else phi(torch.zeros(1, attn.head_dim)).shape[-1]


def mixing_flops(attn: Attention, context: int) -> float:
    """Forward FLOPs per token of one attention layer's token mixing (all heads), projections excluded."""
    H, D = attn.n_head, attn.head_dim
    if isinstance(attn, SoftmaxAttention):
        return 4 * H * D * mean_keys(context, lambda t: t + 1)
    if isinstance(attn, SlidingWindowAttention):
        return 4 * H * D * mean_keys(context, lambda t: min(t + 1, attn.window))
    if isinstance(attn, CHUNKED):
        F, C = feature_dim(attn), attn.chunk_size
        return 2 * H * (F + D) * mean_keys(context, lambda t: t % C + 1) + 4 * H * F * D
    warnings.warn(f"FLOPs of {type(attn).__name__} are unknown to lam.flops: its token mixing counts as 0")
    return 0.0


def forward_flops_per_token(net: nn.Module, context: int) -> float:
    """Forward FLOPs per token of `net` over windows of `context` tokens."""
    linear = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear))
    mixing = sum(mixing_flops(m, context) for m in net.modules() if isinstance(m, Attention))
    return 2 * linear + mixing


def flops_per_token(net: nn.Module, context: int) -> float:
    """Training FLOPs (forward and backward) per token of `net` over windows of `context` tokens."""
    return 3 * forward_flops_per_token(net, context)
