"""Attention mechanisms, all under one contract: `forward(x, state=None) -> (y, state)`."""

from lam.models.attention.base import Attention
from lam.models.attention.linear import LinearAttention
from lam.models.attention.softmax import SoftmaxAttention

__all__ = ["Attention", "LinearAttention", "SoftmaxAttention"]
