"""Causal softmax attention through `scaled_dot_product_attention`, with a KV cache for generation."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lam.models.attention.base import Attention, pairwise_flops


class KVCache(NamedTuple):
    """Keys and values of the tokens seen, in buffers with room for more: appending a token writes into the
    room (O(1)) instead of copying the whole cache (O(S) per token). The buffers grow by doubling. Several
    caches may share buffers, each reading its first `length` positions; `filled[0]` counts the positions
    written, so a second continuation of one cache copies its prefix before writing (copy on write). Under
    torch.compile that check is left out, since inductor fails on it (torch 2.13): the compiled one-token step
    (lam.models.sampling.compiled_step) continues each cache once."""

    k: torch.Tensor  # (B, H, capacity, D)
    v: torch.Tensor  # (B, H, capacity, D)
    length: int      # tokens seen: positions 0 .. length-1 of the buffers hold them
    filled: list     # [positions written into these buffers], shared by the caches that share them

    @property
    def offset(self) -> int:
        return self.length

    @classmethod
    def start(cls, k: torch.Tensor, v: torch.Tensor, room: int) -> "KVCache":
        """A cache holding k, v (B, H, T, D), with room for `room` more tokens."""
        B, H, T, D = k.shape
        kb, vb = k.new_empty(B, H, T + room, D), v.new_empty(B, H, T + room, D)
        kb[:, :, :T], vb[:, :, :T] = k, v
        return cls(kb, vb, T, [T])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """The cache after T more tokens' keys and values (B, H, T, D)."""
        n, T = self.length, k.shape[2]
        shared = not torch.compiler.is_compiling() and self.filled[0] != n  # its room already written
        if shared or n + T > self.k.shape[2]:  # copy into new buffers, with room
            return KVCache.start(self.k[:, :, :n], self.v[:, :, :n], room=max(n, 2 * T, 16)).append(k, v)
        self.k[:, :, n:n + T], self.v[:, :, n:n + T] = k, v
        self.filled[0] = n + T
        return KVCache(self.k, self.v, n + T, self.filled)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


def attend(q, k, v, cpu_float32: bool, **kwargs) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v, **kwargs). cpu_float32: on a CPU, bfloat16/float16 inputs are
    attended in float32 and the output cast back: torch's CPU kernel is slower in bfloat16 at small sizes
    (forward + backward at head_dim 32 on an AVX512-BF16 Xeon: 5x at T = 64, 2x at T = 256; benchmarks/RESULTS.md)."""
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
            return y, KVCache(k, v, k.shape[2], [k.shape[2]])  # no room yet: the first append makes it
        past, T = state.offset, q.shape[2]
        state = state.append(k, v)
        k, v = state.keys_values()
        # query i sits at position past + i and may see keys 0 .. past + i: one query sees them all
        mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        y = attend(q, k, v, self.cpu_float32, attn_mask=mask, dropout_p=dropout)
        return y, state
