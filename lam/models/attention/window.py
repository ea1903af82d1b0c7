"""Sliding-window causal softmax attention (local attention as in Longformer, Beltagy et al. 2020, and
Mistral 7B, Jiang et al. 2023): each query sees the `window` most recent keys, itself included,

    y_t = softmax_{t-W < s <= t}(q_t·k_s / sqrt(d)) v_s.

Training and prefill (no state): scaled_dot_product_attention with a band mask, computed in blocks of W
queries that each see their own block's and the previous block's keys, so the work is O(T·W), not O(T²)
(up to W tokens the band is the causal mask, and SDPA's causal kernel runs).
Generation: a KV cache trimmed to the W-1 most recent keys, all a next query can see besides its own, so
memory and time per token stay constant; the cache's `offset` keeps counting every token for positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lam.models.attention.base import Attention, pairwise_flops
from lam.models.attention.softmax import attend


class WindowCache(NamedTuple):
    k: torch.Tensor  # (B, H, <= W-1, D) the most recent keys
    v: torch.Tensor  # (B, H, <= W-1, D)
    offset: int      # tokens seen


def band(T: int, S: int, window: int, device=None) -> torch.Tensor:
    """(T, S) mask for T queries, the last T of S positions: a query sees keys at distance 0 .. window-1."""
    dist = torch.arange(S - T, S, device=device)[:, None] - torch.arange(S, device=device)
    return (dist >= 0) & (dist < window)


class SlidingWindowAttention(Attention):
    """window: keys each query attends to, itself included (W >= 1; W >= sequence length is plain causal
    softmax attention). cpu_float32: attend in float32 on a CPU under bf16/fp16 autocast (softmax.attend)."""

    def __init__(self, d_model: int, n_head: int, window: int = 256, cpu_float32: bool = True, **kwargs):
        super().__init__(d_model, n_head, **kwargs)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.cpu_float32 = window, cpu_float32

    def mixing_flops(self, context: int) -> float:
        return pairwise_flops(self.n_head, self.head_dim, context, lambda t: min(t + 1, self.window))

    def mix(self, q, k, v, state: WindowCache | None, gates=None):
        dropout = self.dropout if self.training else 0.0
        if state is None and q.shape[2] <= self.window:  # the band is the whole causal triangle
            y = attend(q, k, v, self.cpu_float32, dropout_p=dropout, is_causal=True)
        elif state is None:
            y = self.blocked(q, k, v, dropout)
        else:
            k, v = torch.cat((state.k, k), dim=2), torch.cat((state.v, v), dim=2)
            mask = band(q.shape[2], k.shape[2], self.window, q.device)
            y = attend(q, k, v, self.cpu_float32, attn_mask=mask, dropout_p=dropout)
        T, S = q.shape[2], k.shape[2]
        keep = min(S, self.window - 1)  # a copy, so the trimmed cache does not pin the whole prompt's keys
        offset = T if state is None else state.offset + T
        return y, WindowCache(k[:, :, S - keep:].clone(), v[:, :, S - keep:].clone(), offset)

    def blocked(self, q, k, v, dropout: float):
        """The band mask on blocks of W queries, each with its 2W candidate keys: (B, H, T, D) in and out."""
        B, H, T, D = q.shape
        W = self.window
        pad = (-T) % W  # padded queries come last and are dropped; causality hides the padded keys
        N = (T + pad) // W
        q = F.pad(q, (0, 0, 0, pad)).reshape(B * H, N, W, D)
        # block n's keys: block n-1 (zeros before the first block) then block n, (B·H, N, 2W, D)
        k, v = (F.pad(t, (0, 0, W, pad)).unfold(2, 2 * W, W).transpose(-1, -2).reshape(B * H, N, 2 * W, D)
                for t in (k, v))
        # (N, W, 2W): the band, and in the first block no key before the sequence start
        block, key = torch.arange(N, device=q.device), torch.arange(2 * W, device=q.device)
        first = (block > 0)[:, None, None] | (key >= W)
        mask = band(W, 2 * W, W, q.device) & first
        y = attend(q, k, v, self.cpu_float32, attn_mask=mask, dropout_p=dropout)
        return y.reshape(B, H, N * W, D)[:, :, :T]
