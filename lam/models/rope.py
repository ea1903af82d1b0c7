"""Rotary position embedding (Su et al. 2021, RoFormer): rotate channel pairs of q and k by position-dependent
angles, so q·k depends on the distance between positions."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: (B, H, T, D) at positions offset .. offset+T-1, both rotated by the same angles."""
        T = q.shape[-2]
        pos = torch.arange(offset, offset + T, device=q.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # (T, D/2)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x[2i], x[2i+1]) of x (..., T, D) by the angle whose cos and sin are (T, D/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
