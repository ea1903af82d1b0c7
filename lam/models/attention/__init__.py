"""Attention mechanisms, all under one contract: `forward(x, state=None) -> (y, state)`.

| name      | module        | training / prefill              | generation state               |
| --------- | ------------- | ------------------------------- | ------------------------------ |
| softmax   | softmax.py    | SDPA, causal                    | KV cache, grows                |
| window    | window.py     | SDPA, band mask                 | KV cache of the last W-1 keys  |
| linear    | linear.py     | chunked (quadratic in a chunk)  | (S, z), constant               |
| retention | retention.py  | chunked, fixed decay per head   | S, constant                    |
| gated     | gated.py      | chunked, data-dependent decay   | S, constant                    |
"""

from lam.models.attention.base import Attention
from lam.models.attention.gated import DecayState, GatedLinearAttention
from lam.models.attention.linear import LinearAttention, LinearState
from lam.models.attention.retention import Retention
from lam.models.attention.softmax import KVCache, SoftmaxAttention
from lam.models.attention.window import SlidingWindowAttention, WindowCache

__all__ = ["Attention", "DecayState", "GatedLinearAttention", "KVCache", "LinearAttention", "LinearState",
           "Retention", "SlidingWindowAttention", "SoftmaxAttention", "WindowCache"]
