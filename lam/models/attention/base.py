"""What every attention mechanism shares: the q/k/v and output projections, heads, optional rotary positions.

The contract (DESIGN.md): `forward(x, state=None) -> (y, state)`. `state` carries what a mechanism needs to
continue a sequence (a KV cache, a recurrent state) and always counts the tokens seen so far in `offset`, so
positions continue where they stopped. A subclass implements
- `mix(q, k, v, state, gates)`: the mechanism's own math. `gates` is what `gates(x)` computes from the layer's
  input besides q, k and v: None for every mechanism but gated linear attention, whose decay reads x;
- `mixing_flops(context)`: what its token mixing costs per token (lam.models.flops sums it over the layers).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lam.models.rope import Rotary


def check_chunk_size(chunk_size: int) -> int:
    """`chunk_size` if it can be one (tokens per chunk of a chunked form), else a ValueError."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return chunk_size


class Attention(nn.Module):
    """rope: rotary positions on q and k. qk_norm: RMS-normalise each head's queries and keys over its channels,
    without weights, before rotary positions (QK-norm, as modded-nanogpt does): every q and k that `mix` sees
    has unit RMS."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = False, rope: bool = False,
                 qk_norm: bool = False):
        super().__init__()
        if n_head < 1 or d_model % n_head:
            raise ValueError(f"n_head must be >= 1 and divide d_model={d_model}, got n_head={n_head}")
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.proj.residual = True  # GPT-2 init scales residual projections by 1/sqrt(2 * n_layer)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = Rotary(self.head_dim) if rope else None
        self.qk_norm = qk_norm

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def project(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v of shape (B, H, T, D): q and k RMS-normalised per head when qk_norm is on, then
        rotated to their positions when rope is on."""
        q, k, v = map(self.split_heads, self.qkv(x).split(x.shape[-1], dim=2))
        if self.qk_norm:  # CUDA autocast runs rms_norm in float32: q, k stay in v's dtype, and so does a KV cache
            q, k = (F.rms_norm(t, (self.head_dim,)).to(t.dtype) for t in (q, k))
        if self.rotary is not None:
            offset = 0 if state is None else state.offset
            q, k = self.rotary(q, k, offset)
        return q, k, v

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) head outputs -> (B, T, C) through the output projection."""
        B, H, T, D = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, H * D)))

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        q, k, v = self.project(x, state)
        y, state = self.mix(q, k, v, state, self.gates(x))
        return self.merge(y), state

    def gates(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the mechanism reads from x besides q, k, v, as (B, H, T, .) heads; None: nothing."""
        return None

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any,
            gates: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """(B, H, T, D) queries, keys, values -> (B, H, T, D) outputs and the state after the last token."""
        raise NotImplementedError(f"{type(self).__name__} must implement mix(q, k, v, state, gates)")

    def mixing_flops(self, context: int) -> float:
        """Forward FLOPs per token of the token mixing (all heads, projections excluded), averaged over the
        positions of a window of `context` tokens. A multiply-add is 2 FLOPs."""
        raise NotImplementedError(f"{type(self).__name__} must implement mixing_flops(context): "
                                  "lam.models.flops counts every attention's token mixing")


def mean_keys(context: int, keys_seen: Callable[[int], int]) -> float:
    """Keys a query attends to, averaged over the positions t = 0 .. context-1 of a training window."""
    return sum(keys_seen(t) for t in range(context)) / context


def pairwise_flops(n_head: int, head_dim: int, context: int, keys_seen: Callable[[int], int]) -> float:
    """Attention over explicit query-key pairs (softmax, window): a pair costs 2D for the score and 2D for the
    weighted value, per head of D channels."""
    return 4 * n_head * head_dim * mean_keys(context, keys_seen)


def chunked_flops(n_head: int, feature_dim: int, head_dim: int, chunk_size: int, context: int) -> float:
    """The linear family in chunks of C tokens with F feature channels per head: pairs inside a chunk at
    2(F + D) each, plus reading q·S and adding k vᵀ to the H states of F x D."""
    H, F, D, C = n_head, feature_dim, head_dim, chunk_size
    return 2 * H * (F + D) * mean_keys(context, lambda t: t % C + 1) + 4 * H * F * D


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions, else the dtype itself: recurrent states are long sums (float64 stays
    float64, which gradient checks need)."""
    return torch.promote_types(dtype, torch.float32)


class HeadNorm(nn.Module):
    """RMSNorm over each head's channels, one weight shared by the heads (Zhang & Sennrich 2019). Mechanisms
    without a normaliser (retention, gated, linear with normalize=False) use it to keep their outputs in
    scale. Runs in the input's dtype, so the float32 path stays float32 under autocast."""

    def __init__(self, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(y, (y.shape[-1],), self.weight.to(y.dtype), self.eps)


# tokens (rounded up to whole chunks) that `recomputed` recomputes at once in backward. The layer's peak at
# T = 4096 against softmax's: 1.91x with the whole sequence as one segment, 0.96x with 512, 0.89x with 256,
# 0.82x with 64 but at 1.35x 256's step time (benchmarks/RESULTS.md)
SEGMENT = 256


def recomputed(fn, recompute: bool, chunk_size: int, inputs: tuple, state: tuple):
    """fn(*inputs, *state) -> (y, *state): a mechanism on (B, H, T, .) inputs (None: absent) from a state.

    With `recompute`, in training (grad enabled, more than one token), the sequence is cut into segments of
    SEGMENT tokens, each run under activation checkpointing from the state the previous one left: autograd
    keeps only each segment's inputs and incoming state, and backward recomputes one segment at a time, so
    the feature maps, float32 copies, chunk scores and per-chunk states of at most one segment are held at
    once (one checkpoint of the whole sequence would hold them all again in backward). Segments are whole
    chunks, so the chunks are those of one pass. fn draws no random numbers (dropout is outside mix), so no
    RNG state is stashed."""
    if not (recompute and torch.is_grad_enabled() and inputs[0].shape[2] > 1):
        return fn(*inputs, *state)
    size = -(-SEGMENT // chunk_size) * chunk_size
    pieces = [repeat(None) if t is None else t.split(size, dim=2) for t in inputs]
    ys = []
    for piece in zip(*pieces):
        y, *state = checkpoint(fn, *piece, *state, use_reentrant=False, preserve_rng_state=False)
        ys.append(y)
    return torch.cat(ys, dim=2), *state
