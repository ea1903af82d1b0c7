"""LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank updates of chosen linear layers.

A chosen `nn.Linear` computes  y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ,  with A (r x in) random and
B (out x r) zero, so at the start the model computes exactly what it did. Only A and B train (and, by choice,
the biases or the norms). The layer keeps its `weight` and `bias` under their names, so the state dict of the
base model loads into the adapted one (`strict=False`: the adapters are what is missing), and `merge_lora`
folds B·A into the weights, leaving plain `nn.Linear`s: an ordinary model. `merge_lora_weights` does the same
to a state dict, for whoever holds a LoRA checkpoint without the adapted model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """`base`'s weight and bias (the same parameters), plus a rank-r update scaled by alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(base.weight.new_empty(r, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the paper's code
        self.register_buffer("lora_scaling", torch.tensor(alpha / r))  # in the state dict: merging needs it
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.lora_scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with B·A folded into its weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.lora_scaling * self.lora_B @ self.lora_A)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def add_lora(net: nn.Module, targets: Iterable[str] = ("qkv", "proj", "fc"), r: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, train_biases: bool = False, train_norms: bool = False) -> list[str]:
    """Put adapters on every nn.Linear of `net` whose attribute name is in `targets` (e.g. "qkv" matches each
    block's attn.qkv) and freeze everything else but, by choice, biases and norms' weights. Returns the names
    of the adapted layers."""
    targets = set(targets)
    if r < 1:
        raise ValueError(f"lora.r must be at least 1, got {r}")
    linears = {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    chosen = [name for name in linears if name.rpartition(".")[2] in targets]
    if unknown := targets - {name.rpartition(".")[2] for name in chosen}:
        names = sorted({name.rpartition(".")[2] for name in linears})
        raise ValueError(f"lora.targets {sorted(unknown)} name no linear layer of the model; it has {names}")
    shared = {id(p) for m in net.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    if tied := [name for name in chosen if id(linears[name].weight) in shared]:
        raise ValueError(f"{tied} share their weight with another layer (the tied head): merging an adapter "
                         "into it would change that layer too")
    for p in net.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent), attr, LoRALinear(linears[name], r, alpha, dropout))
    for name, p in net.named_parameters():
        module = net.get_submodule(name.rpartition(".")[0])
        if "lora_" in name or (train_biases and name.endswith(".bias")) \
                or (train_norms and type(module).__name__.endswith("Norm")):
            p.requires_grad_(True)
    return chosen


def merge_lora(net: nn.Module) -> nn.Module:
    """`net` with every adapted layer replaced by a plain nn.Linear holding W + (alpha / r)·B·A, in place."""
    for name, module in list(net.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent), attr, module.merged())
    return net


def merge_lora_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict with the adapters folded into their layers' weights: the state dict of the
    plain model. One without adapters comes back as it is."""
    merged = {k: v for k, v in state_dict.items() if not k.rpartition(".")[2].startswith("lora_")}
    for key in state_dict:
        if key.endswith(".lora_A"):
            layer = key.removesuffix(".lora_A")
            A, B = state_dict[key], state_dict[f"{layer}.lora_B"]
            weight = state_dict[f"{layer}.weight"]
            merged[f"{layer}.weight"] = weight + (state_dict[f"{layer}.lora_scaling"] * B.float() @ A.float()
                                                  ).to(weight.dtype)
    return merged
