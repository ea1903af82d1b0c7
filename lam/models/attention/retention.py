"""Retention (RetNet; Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
Models", arXiv:2307.08621): linear attention whose state decays by a fixed factor gamma per head,

    S_t = gamma_h S_{t-1} + k_t v_tᵀ,   y_t = q_tᵀ S_t / sqrt(d),   gamma_h = 1 - 2^(-5-h), h = 0 .. H-1,

equivalently the parallel form y = (Q Kᵀ ⊙ D) V / sqrt(d) with D_ts = gamma^(t-s) for s <= t, else 0
(paper eq. 5-6). No normaliser: each head's output is RMS-normalised (the paper's GroupNorm, a LayerNorm per
head, as RMSNorm; its swish output gate is left out, as in gated.py). Positions: the paper's xPos is
rotary-like; use model.pos=rope.

The chunked and recurrent forms are gated.py's with a constant log gate log(gamma_h), one per head, so the
within-chunk decays are a (C, C) matrix per head and the chunk may be larger.
"""

from __future__ import annotations

import torch

from lam.models.attention import fla_backend
from lam.models.attention.base import Attention, HeadNorm, accumulation_dtype, check_chunk_size, chunked_flops
from lam.models.attention.gated import DecayState, decayed_mix


def gammas(n_head: int) -> torch.Tensor:
    """The per-head decays of RetNet: 1 - 2^(-5-h), from 0.96875 (a ~32-token memory) towards 1."""
    return 1 - 2.0 ** (-5.0 - torch.arange(n_head, dtype=torch.float64))


class Retention(Attention):
    """Multi-head retention with RetNet's fixed decays.

    chunk_size: tokens per chunk of the parallel form (64: fastest on CPU, benchmarks/RESULTS.md).
    norm_eps: eps of the per-head RMSNorm on the output.
    backend: "torch", or "fla" for flash-linear-attention's chunk_simple_gla kernel in training and prefill.
    recompute: in training, keep only q, k, v and the incoming state for backward and recompute the decays,
        chunk scores and states there (base.recomputed). Generation and no-grad calls are unaffected.
    """

    def __init__(self, d_model: int, n_head: int, chunk_size: int = 64, norm_eps: float = 1e-5,
                 backend: str = "torch", recompute: bool = False, **kwargs):
        super().__init__(d_model, n_head, **kwargs)
        fla_backend.check_backend(backend)
        self.chunk_size, self.backend, self.recompute = check_chunk_size(chunk_size), backend, recompute
        self.norm = HeadNorm(self.head_dim, norm_eps)

    def mixing_flops(self, context: int) -> float:
        return chunked_flops(self.n_head, self.head_dim, self.head_dim, self.chunk_size, context)

    def log_gates(self, gates: None, q: torch.Tensor) -> torch.Tensor:
        """(B, H, T, 1): log gamma_h at every token."""
        B, H, T, _ = q.shape
        # computed here, not held in a buffer, which model.to(torch.bfloat16) would round
        log_gamma = gammas(H).log().to(q.device, accumulation_dtype(q.dtype))
        return log_gamma.view(1, H, 1, 1).expand(B, H, T, 1)

    def mix(self, q, k, v, state: DecayState | None, gates=None):
        return decayed_mix(q, k, v, gates, state, self)
