"""What every attention mechanism shares: the q/k/v and output projections, heads, optional rotary positions.

The contract (DESIGN.md): `forward(x, state=None) -> (y, state)`. `state` carries what a mechanism needs to
continue a sequence (a KV cache, a recurrent state) and always counts the tokens seen so far in `offset`, so
positions continue where they stopped. A subclass implements `mix`, the mechanism's own math; one that needs
more than q, k, v (the gates of gated linear attention read x) overrides `forward` with the same three steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lam.models.rope import Rotary


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = False, rope: bool = False):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.proj.residual = True  # GPT-2 init scales residual projections by 1/sqrt(2 * n_layer)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = Rotary(self.head_dim) if rope else None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def project(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v of shape (B, H, T, D), rotated to their positions when rope is on."""
        q, k, v = map(self.split_heads, self.qkv(x).split(x.shape[-1], dim=2))
        if self.rotary is not None:
            offset = 0 if state is None else state.offset
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        return q, k, v

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) head outputs -> (B, T, C) through the output projection."""
        B, H, T, D = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, H * D)))

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        q, k, v = self.project(x, state)
        y, state = self.mix(q, k, v, state)
        return self.merge(y), state

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """(B, H, T, D) queries, keys, values -> (B, H, T, D) outputs and the state after the last token."""
        raise NotImplementedError


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
