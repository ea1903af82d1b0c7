"""Feature maps phi for linear attention: similarity(q, k) = phi(q) · phi(k).

A positive map (phi(q)·phi(k) >= 0) keeps the normaliser phi(q)·sum_s phi(k_s) non-negative, so it can divide;
`identity` is not positive and is only allowed without the normaliser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def elu1(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1, positive everywhere (Katharopoulos et al. 2020)."""
    return F.elu(x) + 1


def relu(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0), non-negative and sparse (Qin et al. 2022, cosFormer's base map)."""
    return F.relu(x)


def identity(x: torch.Tensor) -> torch.Tensor:
    """x itself: plain bilinear q·k, as in GLA and RetNet. Not positive: use with normalize=False."""
    return x


def taylor(x: torch.Tensor) -> torch.Tensor:
    """2nd-order Taylor expansion of exp(q·k / sqrt(d)) (Based, Arora et al. 2024, "Simple linear attention
    language models balance the recall-throughput tradeoff", Sec. 3.1, and their TaylorExp feature map):

        phi(x) = [1, x / d^(1/4), vec(x xᵀ) / (sqrt(2) sqrt(d))],
        phi(q)·phi(k) = 1 + q·k/√d + (q·k)²/(2d) >= 1/2.

    x xᵀ is symmetric, so only its upper triangle is kept: the diagonal divided by sqrt(2) and the
    off-diagonal pairs once (their two copies sum to x_i x_j y_i y_j). Same dot products, d(d+1)/2 features
    instead of d².
    Output dim: 1 + d + d(d+1)/2."""
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, device=x.device)
    pair_scale = torch.where(i == j, 2 ** -0.5, 1.0).to(x.dtype) / d ** 0.5
    ones = x.new_ones(*x.shape[:-1], 1)
    return torch.cat((ones, x / d ** 0.25, x[..., i] * x[..., j] * pair_scale), dim=-1)


FEATURE_MAPS = {"elu1": elu1, "relu": relu, "identity": identity, "taylor": taylor}
POSITIVE = {"elu1", "relu", "taylor"}  # maps with phi(q)·phi(k) >= 0
