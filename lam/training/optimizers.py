"""Muon for the hidden matrices, AdamW for the rest (Jordan et al. 2024, "Muon: an optimizer for hidden layers
in neural networks"; the split modded-nanogpt's speedrun records use).

Muon steps each matrix W along the nearest semi-orthogonal matrix to its momentum M = U S Vᵀ, that is U Vᵀ,
found by a few Newton-Schulz iterations. It is defined for 2-D weights, and meant for hidden layers, so
embeddings, the output head (tied to one or not), norms and biases stay with AdamW. `Muon` here is
torch.optim.Muon's update (same momentum, Nesterov, lr adjustment and weight decay) with the iterations batched
over all matrices of one shape: on a 2-core AVX512-BF16 Xeon the 16 matrices of the recipe model take 14 ms a
step instead of torch's 26 (benchmarks/RESULTS.md, Time to quality). `MuonAdamW` gives Lightning, the lr
schedulers and the checkpoints one `torch.optim.Optimizer`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.optim import AdamW, Optimizer

from lam.training.precision import cpu_precision

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al.'s quintic: steepest slope at 0 that still converges


def orthogonalize(G: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7) -> torch.Tensor:
    """(..., m, n) matrices -> approximately U Vᵀ of each G = U S Vᵀ (singular values pushed into ~[0.7, 1.2]):
    X <- a X + (b A + c A²) X with A = X Xᵀ, from X = G / |G|_F, on the wide orientation (A is min(m, n)²)."""
    a, b, c = coefficients
    wide = G.size(-2) <= G.size(-1)
    X = G if wide else G.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


def adjusted_lr(lr: float, shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's per-shape lr: "original" (None) scales by sqrt(max(1, rows/cols)); "match_rms_adamw"
    by 0.2·sqrt(max(rows, cols)), the RMS of an AdamW update (Liu et al. 2025, "Muon is scalable")."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be original, match_rms_adamw or null, got {adjust_lr_fn!r}")


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 (Muon's own choice) on GPUs and on CPUs that multiply it in hardware; float32 elsewhere, where
    bfloat16 is emulated."""
    return torch.bfloat16 if device.type != "cpu" or cpu_precision() == "bf16-mixed" else torch.float32


def loss_of(closure: Callable[[], float] | None):
    """What `Optimizer.step(closure)` computes first: the closure's loss, with gradients on; None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters. Per matrix W with gradient G:
    M <- lerp(M, G, 1 - momentum); U = lerp(G, M, momentum) if nesterov else M;
    W <- W·(1 - lr·weight_decay) - adjusted_lr · orthogonalize(U).

    ns_dtype: dtype of the iterations ("bfloat16", "float32"); null: `default_ns_dtype` for the device of the
    first step's parameters, decided then, once."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, adjust_lr_fn: str | None = None,
                 ns_dtype: str | None = None):
        adjusted_lr(1.0, torch.Size((1, 1)), adjust_lr_fn)  # checks the name
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                                  "weight_decay": weight_decay, "adjust_lr_fn": adjust_lr_fn})
        bad = [tuple(p.shape) for g in self.param_groups for p in g["params"] if p.dim() != 2]
        if bad:
            raise ValueError(f"Muon takes 2-D matrices only, got shapes {bad}")
        self.ns_dtype = None if ns_dtype is None else getattr(torch, ns_dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = loss_of(closure)
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                by_shape[p.shape].append((p, p.grad.lerp(buf, momentum) if group["nesterov"] else buf))
            for shape, items in by_shape.items():
                params = [p for p, _ in items]
                if self.ns_dtype is None:  # cpu_precision reads /proc/cpuinfo: not on every step
                    self.ns_dtype = default_ns_dtype(params[0].device)
                updates = orthogonalize(torch.stack([u for _, u in items]).to(self.ns_dtype), group["ns_steps"])
                step = adjusted_lr(lr, shape, group["adjust_lr_fn"])
                for p, u in zip(params, updates):
                    p.mul_(1 - lr * wd).add_(u.to(p.dtype), alpha=-step)
        return loss


class MuonAdamW(Optimizer):
    """groups: parameter groups as `lam.training.lightning_module.param_groups` builds them; the first (the
    hidden matrices) goes to Muon, the others (an untied head, then embeddings, norms, biases) to
    torch.optim.AdamW.

    weight_decay: the decoupled decay of every group that names none: Muon's of the matrices, AdamW's of an
    untied head (the no-decay group carries its own, 0);
    lr, betas, fused: AdamW's, for the head, embeddings and norms; muon_lr, momentum, nesterov, ns_steps,
    adjust_lr_fn, ns_dtype: Muon's. param_groups and state are the two inner optimizers' own objects."""

    def __init__(self, groups: list[dict], lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, fused: bool | None = None, muon_lr: float = 0.02,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 ns_dtype: str | None = None):
        matrices, others = groups[0], [g for g in groups[1:] if g["params"]]
        self.muon = Muon([matrices], lr=muon_lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                         weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        self.adamw = AdamW(others, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})
        self.link()

    def link(self) -> None:
        """Point the inner optimizers at this one's groups and state (load_state_dict replaces both)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = loss_of(closure)
        self.muon.step()
        self.adamw.step()
        return loss
