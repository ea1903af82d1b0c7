"""Gated linear attention (GLA; Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training", arXiv:2312.06635): linear attention whose state decays through
data-dependent per-channel gates,

    S_t = diag(alpha_t) S_{t-1} + k_t v_tᵀ,   y_t = q_tᵀ S_t / sqrt(d),   alpha_t in (0, 1)^d,
    alpha_t = sigmoid(x_t W_1 W_2 + b)^(1/tau),  W_1: (d_model, 16), W_2: (16, d_model),  tau = 16 (Sec 4.1).

No normaliser: each head's output is RMS-normalised (the paper uses LayerNorm; its swish output gate is left
out, so the mechanisms of this package differ in their token mixing only).

The math is written for a log gate g_t = log alpha_t of any width: one value per key channel here, one per
head in retention (retention.py), which reuses `chunked` and `recurrent`.
- `chunked`: inside a chunk of C tokens with b_i = sum_{j<=i} g_j (a cumulative sum in log space, float32),
      y_i = sum_{j<=i} (q_i ⊙ exp(b_i - b_j))·k_j v_j  +  (q_i ⊙ exp(b_i))ᵀ S_before,
      S_after = diag(exp(b_C)) S_before + sum_j (k_j ⊙ exp(b_C - b_j)) v_jᵀ;
  every exponent is <= 0 (g <= 0), so nothing overflows however strong the decay. With per-channel gates the
  (C, C, d) decays are materialised, hence a small default chunk; with one gate per head they are a (C, C)
  matrix.
- `recurrent`: the first line, one token at a time.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lam.models.attention import fla_backend
from lam.models.attention.base import (
    Attention, HeadNorm, accumulation_dtype, check_chunk_size, chunked_flops, recomputed,
)


class DecayState(NamedTuple):
    S: torch.Tensor  # (B, H, K, V) the decayed sum of k_s v_sᵀ
    offset: int      # tokens seen


def chunked(q, k, v, g, S, chunk_size: int):
    """q, k: (B, H, T, K); v: (B, H, T, V); g: (B, H, T, G) log gates <= 0 with G = K (per channel) or 1 (per
    head); S: (B, H, K, V) the state before the first token. Returns y (B, H, T, V) and the state after."""
    B, H, T, _ = q.shape
    C = chunk_size
    pad = (-T) % C
    if pad:  # padded tokens: zero keys add nothing, zero log gates decay nothing, so the final state is exact
        q, k, v, g = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, g))
    N = (T + pad) // C
    q, k, v, g = (t.reshape(B, H, N, C, t.shape[-1]) for t in (q, k, v, g))

    b = g.cumsum(dim=3)  # (B, H, N, C, G) log decay from the chunk start to token i, inclusive
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = b[..., :, None, :] - b[..., None, :, :]  # (B, H, N, C, C, G) b_i - b_j
    diff = diff.masked_fill(~causal[..., None], float("-inf"))  # exp gives 0 where j > i
    if g.shape[-1] == 1:
        A = (q @ k.transpose(-1, -2)) * diff.squeeze(-1).exp()  # (B, H, N, C, C)
    else:
        A = (q[..., :, None, :] * k[..., None, :, :] * diff.exp()).sum(dim=-1)
    b_last = b[..., -1:, :]  # (B, H, N, 1, G)
    kv = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # (B, H, N, K, V) a chunk's contribution at its end
    decay = b_last.transpose(-1, -2).exp()  # (B, H, N, G, 1) how much the state fades over a chunk
    S_before = []
    for decay_n, kv_n in zip(decay.unbind(2), kv.unbind(2)):  # the state across chunks: N recurrence steps
        S_before.append(S)
        S = decay_n * S + kv_n
    y = A @ v + (q * b.exp()) @ torch.stack(S_before, dim=2)
    return y.reshape(B, H, N * C, -1)[:, :, :T], S


def recurrent(q, k, v, g, S):
    """The same function one token at a time: O(K·V) work and memory per token."""
    ys = []
    for t in range(q.shape[2]):
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        ys.append((q[:, :, t, None, :] @ S).squeeze(-2))
    return torch.stack(ys, dim=2), S


def decayed_mix(q, k, v, gates, state: DecayState | None, layer):
    """The `mix` retention and GLA share: `decayed_state` on the state's tensor, recomputed in backward when
    layer.recompute (base.recomputed). layer: the Retention or GatedLinearAttention calling."""
    S, offset = (None, 0) if state is None else state
    y, S = recomputed(partial(decayed_state, layer=layer), layer.recompute, layer.chunk_size, (q, k, v, gates), (S,))
    return y, DecayState(S, offset + q.shape[2])


def decayed_state(q, k, v, gates, S, layer):
    """float32 accumulation, the log gates layer.log_gates(gates, q) (B, H, T, G), the form per call (one token:
    recurrent, else chunked or fla's kernel), the per-head RMSNorm layer.norm. S: the state, None: empty.
    Returns y in v's dtype and the state after the last token."""
    dtype, acc = v.dtype, accumulation_dtype(v.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        g = layer.log_gates(gates, q).to(acc)
        q, k, v = q.to(acc) * q.shape[-1] ** -0.5, k.to(acc), v.to(acc)
        if S is None:
            S = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
        if q.shape[2] == 1:
            y, S = recurrent(q, k, v, g, S)
        elif layer.backend == "fla":  # gates in fla's layout: (B, T, H) per head, (B, T, H, K) per channel
            per_head = g.shape[-1] == 1
            op, g_fla = ("simple_gla.chunk_simple_gla", g[..., 0]) if per_head else ("gla.chunk_gla", g)
            y, S = fla_backend.run(op, q, k, v, S, g=g_fla.transpose(1, 2), scale=1.0)
        else:
            y, S = chunked(q, k, v, g, S, layer.chunk_size)
        y = layer.norm(y)
    return y.to(dtype), S


class GatedLinearAttention(Attention):
    """Multi-head GLA: its decay gates read x (`gates`).

    gate_rank: rank of the gate projection x -> W_1 W_2 (paper: 16).
    gate_temperature: tau in alpha = sigmoid(.)^(1/tau); larger keeps alpha nearer 1, a longer memory
        (paper: 16).
    chunk_size: tokens per chunk of the parallel form (8: as fast as 4 and the least memory on CPU,
        benchmarks/RESULTS.md).
    norm_eps: eps of the per-head RMSNorm on the output.
    backend: "torch", or "fla" for flash-linear-attention's chunk_gla kernel in training and prefill.
    recompute: in training, keep only q, k, v, the gate logits and the incoming state for backward and
        recompute the log gates, decays, chunk scores and states there (base.recomputed). Generation and
        no-grad calls are unaffected.
    """

    def __init__(self, d_model: int, n_head: int, gate_rank: int = 16, gate_temperature: float = 16.0,
                 chunk_size: int = 8, norm_eps: float = 1e-5, backend: str = "torch", recompute: bool = False,
                 **kwargs):
        super().__init__(d_model, n_head, **kwargs)
        fla_backend.check_backend(backend)
        self.gate = nn.Sequential(nn.Linear(d_model, gate_rank, bias=False), nn.Linear(gate_rank, d_model))
        self.gate_temperature, self.chunk_size, self.backend = gate_temperature, check_chunk_size(chunk_size), backend
        self.recompute = recompute
        self.norm = HeadNorm(self.head_dim, norm_eps)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) gate logits, one per key channel."""
        return self.split_heads(self.gate(x))

    def mixing_flops(self, context: int) -> float:
        return chunked_flops(self.n_head, self.head_dim, self.head_dim, self.chunk_size, context)

    def log_gates(self, gates: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) gate logits -> log alpha = logsigmoid(gates) / tau, computed in float32."""
        return F.logsigmoid(gates.to(accumulation_dtype(gates.dtype))) / self.gate_temperature

    def mix(self, q, k, v, state: DecayState | None, gates: torch.Tensor = None):
        return decayed_mix(q, k, v, gates, state, self)
