"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    y_t = phi(q_t)ᵀ S_t / (phi(q_t) · z_t + eps),   S_t = sum_{s<=t} phi(k_s) v_sᵀ,   z_t = sum_{s<=t} phi(k_s)

Two forms of the same function:
- `chunked`: the sequence is cut into chunks of C tokens; inside a chunk the masked quadratic form, across chunks
  the running state (S, z). O(T·C·d + T·d²) time, used for training and prefill.
- `recurrent`: one token at a time, constant memory per token, used for generation.
Both run in float32, also under bf16 autocast: the state is a long sum.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lam.models.attention.base import Attention
from lam.models.attention.feature_maps import FEATURE_MAPS


class LinearState(NamedTuple):
    S: torch.Tensor  # (B, H, F, Dv) sum of phi(k_s) v_sᵀ
    z: torch.Tensor  # (B, H, F)     sum of phi(k_s), the normaliser
    offset: int      # tokens seen


def chunked(q, k, v, S, z, chunk_size: int, eps: float):
    """q, k: (B, H, T, F) feature-mapped; v: (B, H, T, Dv); S, z: state before the first token.
    Returns (y, S, z) with the state after the last token."""
    B, H, T, Fd = q.shape
    C = chunk_size
    pad = (-T) % C
    if pad:  # zero keys and values add nothing to the state
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    N = (T + pad) // C
    q, k, v = (t.reshape(B, H, N, C, t.shape[-1]) for t in (q, k, v))

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    A = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, N, C, C) within-chunk similarities
    kv = k.transpose(-1, -2) @ v  # (B, H, N, F, Dv) each chunk's contribution to S
    ks = k.sum(dim=3)  # (B, H, N, F) each chunk's contribution to z
    # state before each chunk: the incoming state plus all earlier chunks (an exclusive prefix sum)
    S_before = torch.cat((S[:, :, None], S[:, :, None] + kv.cumsum(dim=2)), dim=2)
    z_before = torch.cat((z[:, :, None], z[:, :, None] + ks.cumsum(dim=2)), dim=2)
    num = A @ v + q @ S_before[:, :, :-1]
    den = A.sum(dim=-1) + (q * z_before[:, :, :-1, None, :]).sum(dim=-1)
    y = num / (den[..., None] + eps)
    return y.reshape(B, H, N * C, -1)[:, :, :T], S_before[:, :, -1], z_before[:, :, -1]


def recurrent(q, k, v, S, z, eps: float):
    """The same function one token at a time: O(F·Dv) work and memory per token."""
    ys = []
    for t in range(q.shape[2]):
        q_t, k_t, v_t = q[:, :, t], k[:, :, t], v[:, :, t]
        S = S + k_t[..., :, None] * v_t[..., None, :]
        z = z + k_t
        num = (q_t[..., None, :] @ S).squeeze(-2)
        den = (q_t * z).sum(dim=-1, keepdim=True)
        ys.append(num / (den + eps))
    return torch.stack(ys, dim=2), S, z


class LinearAttention(Attention):
    """Multi-head causal linear attention.

    feature_map: name in FEATURE_MAPS; chunk_size: tokens per chunk of the parallel form;
    eps: added to the normaliser phi(q)·z, which is a sum of non-negative terms, so it never divides by ~0.
    """

    def __init__(self, d_model: int, n_head: int, feature_map: str = "elu1", chunk_size: int = 64,
                 eps: float = 1e-6, **kwargs):
        super().__init__(d_model, n_head, **kwargs)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {feature_map!r}; choose one of {sorted(FEATURE_MAPS)}")
        self.phi = FEATURE_MAPS[feature_map]
        self.chunk_size, self.eps = chunk_size, eps

    def mix(self, q, k, v, state: LinearState | None):
        dtype = v.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = self.phi(q.float()), self.phi(k.float()), v.float()
            if state is None:
                B, H, _, Fd = k.shape
                S = k.new_zeros(B, H, Fd, v.shape[-1])
                z = k.new_zeros(B, H, Fd)
                offset = 0
            else:
                S, z, offset = state
            if q.shape[2] == 1:
                y, S, z = recurrent(q, k, v, S, z, self.eps)
            else:
                y, S, z = chunked(q, k, v, S, z, self.chunk_size, self.eps)
        return y.to(dtype), LinearState(S, z, offset + q.shape[2])
