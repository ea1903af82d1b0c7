"""The optional `backend: fla` path: the same math through the Triton kernels of flash-linear-attention
(`pip install flash-linear-attention`, import name `fla`; https://github.com/fla-org/flash-linear-attention).
Imported lazily, CUDA only, never a dependency. Only training and prefill use it; one-token generation steps
stay in the torch recurrent form, whose state layout (B, H, K, V) is the one fla uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import torch

BACKENDS = ("torch", "fla")
KERNEL_DEVICES = ("cuda",)  # device types fla's Triton kernels run on


def check_backend(backend: str) -> None:
    """Raise a clear error at construction when `backend` cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "fla":
        if importlib.util.find_spec("fla") is None:
            raise ImportError("backend='fla' needs the flash-linear-attention package (import name `fla`): "
                              "pip install flash-linear-attention, or use backend='torch'")
        if not torch.cuda.is_available():
            raise RuntimeError("backend='fla' runs Triton kernels and needs a CUDA GPU; "
                               "use backend='torch' on CPU")


def run(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, **kwargs):
    """Call fla's `op` ("linear_attn.chunk_linear_attn", "gla.chunk_gla", "simple_gla.chunk_simple_gla") on
    (B, H, T, D) tensors with initial state S (B, H, K, V); returns y (B, H, T, V) and the final state.
    Gates in kwargs come in fla's (B, T, H, ...) layout."""
    if q.device.type not in KERNEL_DEVICES:
        raise RuntimeError(f"backend='fla' needs CUDA tensors, got {q.device}; move the model to a GPU")
    module, name = op.rsplit(".", 1)
    fn = getattr(importlib.import_module(f"fla.ops.{module}"), name)
    if "head_first" in inspect.signature(fn).parameters:  # older fla releases default to (B, H, T, D)
        kwargs["head_first"] = False
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # fla's layout: (B, T, H, D)
    y, S = fn(q=q, k=k, v=v, initial_state=S, output_final_state=True, **kwargs)
    return y.transpose(1, 2), S
