"""Causal softmax attention through `scaled_dot_product_attention`, with a KV cache for generation."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lam.models.attention.base import Attention, pairwise_flops


class KVCache(NamedTuple):
    k: torch.Tensor  # (B, H, S, D) keys of every token seen so far
    v: torch.Tensor  # (B, H, S, D)

    @property
    def offset(self) -> int:
        return self.k.shape[2]


class SoftmaxAttention(Attention):
    """softmax(q kᵀ / sqrt(d) + causal mask) v. Training and prefill: O(T²); a cached step: O(T)."""

    def mixing_flops(self, context: int) -> float:
        return pairwise_flops(self.n_head, self.head_dim, context, lambda t: t + 1)

    def mix(self, q, k, v, state: KVCache | None, gates=None):
        dropout = self.dropout if self.training else 0.0
        if state is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            return y, KVCache(k, v)
        past = state.offset
        k, v = torch.cat((state.k, k), dim=2), torch.cat((state.v, v), dim=2)
        T, S = q.shape[2], k.shape[2]
        # query i sits at position past + i and may see keys 0 .. past + i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return y, KVCache(k, v)
