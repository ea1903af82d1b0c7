"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    y_t = phi(q_t)ᵀ S_t / (phi(q_t)·z_t + eps),   S_t = sum_{s<=t} phi(k_s) v_sᵀ,   z_t = sum_{s<=t} phi(k_s)

With `normalize=False` the denominator is dropped, y_t = phi(q_t)ᵀ S_t, and the output is RMS-normalised per
head instead (as flash-linear-attention does; the normaliser is a known source of instability, Qin et al.
2022, "The Devil in Linear Transformer").

Two forms of the same function:
- `chunked`: the sequence is cut into chunks of C tokens; inside a chunk the masked quadratic form, across
  chunks the running state (S, z). O(T·C·F + T·F·Dv) time, used for training and prefill.
- `recurrent`: one token at a time, constant memory per token, used for generation.
Both run in float32 (at least), also under bf16 autocast: the state is a long sum. With `recompute`, training
keeps only the mechanism's inputs for backward and recomputes the rest there, a segment at a time
(`base.recomputed`, which retention and gated linear attention use too).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lam.models.attention import fla_backend
from lam.models.attention.base import (
    Attention, HeadNorm, accumulation_dtype, check_chunk_size, chunked_flops, recomputed,
)
from lam.models.attention.feature_maps import FEATURE_MAPS, POSITIVE


class LinearState(NamedTuple):
    S: torch.Tensor  # (B, H, F, Dv) sum of phi(k_s) v_sᵀ
    z: torch.Tensor  # (B, H, F)     sum of phi(k_s), the normaliser
    offset: int      # tokens seen


def chunked(q, k, v, S, z, chunk_size: int, eps: float, normalize: bool = True):
    """q, k: (B, H, T, F) feature-mapped; v: (B, H, T, Dv); S, z: state before the first token.
    Returns (y, S, z) with the state after the last token."""
    B, H, T, _ = q.shape
    C = chunk_size
    # z is the state of one more value channel that is always 1, so the matmuls that give the numerator give
    # the denominator as well
    v = torch.cat((v, v.new_ones(B, H, T, 1)), dim=-1)
    S = torch.cat((S, z[..., None]), dim=-1)
    pad = (-T) % C
    if pad:  # zero keys and values add nothing to the state
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    N = (T + pad) // C
    q, k, v = (t.reshape(B, H, N, C, t.shape[-1]) for t in (q, k, v))

    A = (q @ k.transpose(-1, -2)).tril()  # (B, H, N, C, C) within-chunk similarities, s <= t
    kv = k.transpose(-1, -2) @ v  # (B, H, N, F, Dv+1) each chunk's contribution to [S, z]
    # the state before each chunk and after the last: a prefix sum over [incoming state, chunk 0, chunk 1...]
    states = torch.cat((S[:, :, None], kv), dim=2).cumsum(dim=2)
    y = (A @ v + q @ states[:, :, :-1]).reshape(B, H, N * C, -1)[:, :, :T]
    num, den = y[..., :-1], y[..., -1:]
    # copies, so that the state does not pin `states`
    S, z = states[:, :, -1, :, :-1].contiguous(), states[:, :, -1, :, -1].contiguous()
    return (num / (den + eps) if normalize else num), S, z


def recurrent(q, k, v, S, z, eps: float, normalize: bool = True):
    """The same function one token at a time: O(F·Dv) work and memory per token."""
    ys = []
    for t in range(q.shape[2]):
        q_t, k_t, v_t = q[:, :, t], k[:, :, t], v[:, :, t]
        S = S + k_t[..., :, None] * v_t[..., None, :]
        z = z + k_t
        y = (q_t[..., None, :] @ S).squeeze(-2)
        if normalize:
            y = y / ((q_t * z).sum(dim=-1, keepdim=True) + eps)
        ys.append(y)
    return torch.stack(ys, dim=2), S, z


def fla_chunked(q, k, v, S, z, eps: float, normalize: bool = True):
    """`chunked` through fla's kernel for the numerator (scale 1: phi is already applied); the denominator,
    which fla computes without the incoming z, stays here."""
    y, S_out = fla_backend.run("linear_attn.chunk_linear_attn", q, k, v, S, scale=1.0, normalize=False)
    z_t = z[:, :, None] + k.cumsum(dim=2)  # (B, H, T, F) z after each token
    if normalize:
        y = y / ((q * z_t).sum(dim=-1, keepdim=True) + eps)
    return y, S_out, z_t[:, :, -1]


class LinearAttention(Attention):
    """Multi-head causal linear attention.

    feature_map: name in FEATURE_MAPS (elu1, relu, identity, taylor).
    normalize: divide by phi(q)·z + eps (needs a positive map); False: no denominator, RMSNorm per head.
    chunk_size: tokens per chunk of the parallel form (64 measured fastest on CPU for head_dim 64,
        benchmarks/RESULTS.md).
    eps: added to the normaliser phi(q)·z, a sum of non-negative terms, so a query orthogonal to every key
        (possible with relu) gives 0 instead of 0/0.
    norm_eps: eps of the RMSNorm used when normalize=False.
    backend: "torch", or "fla" for flash-linear-attention's CUDA kernels in training and prefill.
    recompute: in training, keep only q, k, v and the incoming state for backward and recompute the feature
        maps, chunk scores and states there, SEGMENT tokens at a time: less memory for a second forward of the
        mechanism (`base.recomputed`). Generation and no-grad calls are unaffected.
    """

    def __init__(self, d_model: int, n_head: int, feature_map: str = "elu1", normalize: bool = True,
                 chunk_size: int = 64, eps: float = 1e-6, norm_eps: float = 1e-5, backend: str = "torch",
                 recompute: bool = False, **kwargs):
        super().__init__(d_model, n_head, **kwargs)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {feature_map!r}; choose one of {sorted(FEATURE_MAPS)}")
        if normalize and feature_map not in POSITIVE:
            raise ValueError(f"feature_map={feature_map!r} can make phi(q)·z negative or zero; "
                             "use it with normalize=False")
        fla_backend.check_backend(backend)
        self.phi = FEATURE_MAPS[feature_map]
        self.normalize, self.chunk_size, self.eps, self.backend = normalize, check_chunk_size(chunk_size), eps, backend
        self.recompute = recompute
        self.norm = None if normalize else HeadNorm(self.head_dim, norm_eps)

    def mixing_flops(self, context: int) -> float:
        features = self.phi(torch.zeros(1, self.head_dim)).shape[-1]
        return chunked_flops(self.n_head, features, self.head_dim, self.chunk_size, context)

    def mix(self, q, k, v, state: LinearState | None, gates=None):
        S, z, offset = (None, None, 0) if state is None else state
        y, S, z = recomputed(self.mix_state, self.recompute, self.chunk_size, (q, k, v), (S, z))
        return y, LinearState(S, z, offset + q.shape[2])

    def mix_state(self, q, k, v, S, z):
        """mix from the state's tensors (None: empty): y in v's dtype and the (S, z) after the last token."""
        dtype, acc = v.dtype, accumulation_dtype(v.dtype)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = self.phi(q.to(acc)), self.phi(k.to(acc)), v.to(acc)
            if S is None:
                B, H, _, Fd = k.shape
                S, z = k.new_zeros(B, H, Fd, v.shape[-1]), k.new_zeros(B, H, Fd)
            if q.shape[2] == 1:
                y, S, z = recurrent(q, k, v, S, z, self.eps, self.normalize)
            elif self.backend == "fla":
                y, S, z = fla_chunked(q, k, v, S, z, self.eps, self.normalize)
            else:
                y, S, z = chunked(q, k, v, S, z, self.chunk_size, self.eps, self.normalize)
            if self.norm is not None:
                y = self.norm(y)
        return y.to(dtype), S, z
