"""Feature maps phi for linear attention: similarity(q, k) = phi(q) · phi(k)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def elu1(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1, positive everywhere (Katharopoulos et al. 2020)."""
    return F.elu(x) + 1


FEATURE_MAPS = {"elu1": elu1}
