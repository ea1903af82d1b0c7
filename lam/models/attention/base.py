"""What every attention mechanism shares: the q/k/v and output projections, heads, optional rotary positions.

The contract (DESIGN.md): `forward(x, state=None) -> (y, state)`. `state` carries what a mechanism needs to
continue a sequence (a KV cache, a recurrent state) and always counts the tokens seen so far in `offset`, so
positions continue where they stopped. A subclass implements only `mix`, the mechanism's own math.
"""

from __future__ import annotations

from typing import Any

import torch
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

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        B, T, C = x.shape
        q, k, v = map(self.split_heads, self.qkv(x).split(C, dim=2))
        if self.rotary is not None:
            offset = 0 if state is None else state.offset
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        y, state = self.mix(q, k, v, state)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y)), state

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """(B, H, T, D) queries, keys, values -> (B, H, T, D) outputs and the state after the last token."""
        raise NotImplementedError
