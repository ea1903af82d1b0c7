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


def attend(q, k, v, cpu_float32: bool, **kwargs) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v, **kwargs). cpu_float32: on a CPU, bfloat16/float16 inputs are
    attended in float32 and the output cast back: torch's CPU kernel is slower in bfloat16 at small sizes
    (forward + backward at head_dim 32: 5x at T = 64, 2x at T = 256; benchmarks/RESULTS.md, Training speed)."""
    dtype = q.dtype
    if cpu_float32 and q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class SoftmaxAttention(Attention):
    """softmax(q kᵀ / sqrt(d) + causal mask) v. Training and prefill: O(T²); a cached step: O(T).

    cpu_float32: attend in float32 on a CPU under bf16/fp16 autocast (see `attend`)."""

    def __init__(self, d_model: int, n_head: int, cpu_float32: bool = True, **kwargs):
        super().__init__(d_model, n_head, **kwargs)
        self.cpu_float32 = cpu_float32

    def mixing_flops(self, context: int) -> float:
        return pairwise_flops(self.n_head, self.head_dim, context, lambda t: t + 1)

    def mix(self, q, k, v, state: KVCache | None, gates=None):
        dropout = self.dropout if self.training else 0.0
        if state is None:
            y = attend(q, k, v, self.cpu_float32, dropout_p=dropout, is_causal=True)
            return y, KVCache(k, v)
        past = state.offset
        k, v = torch.cat((state.k, k), dim=2), torch.cat((state.v, v), dim=2)
        T, S = q.shape[2], k.shape[2]
        # query i sits at position past + i and may see keys 0 .. past + i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
        y = attend(q, k, v, self.cpu_float32, attn_mask=mask, dropout_p=dropout)
        return y, KVCache(k, v)
