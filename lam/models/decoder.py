"""The LAM decoder: a GPT-2 style pre-norm transformer whose attention is a constructor argument.

    tokens -> token embedding (+ learned positions) -> n_layer x [x + attn(ln(x)); x + mlp(ln(x))] -> ln -> head

The head shares its weight with the token embedding (unless tie_head=False). Pure PyTorch: build and run it
without Lightning or Hydra:

    net = LAM(vocab_size=65, attention=functools.partial(LinearAttention, chunk_size=32))
    logits, state = net(torch.randint(65, (1, 16)))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lam.models.attention import Attention, SoftmaxAttention


class ReLUSquared(nn.Module):
    """relu(x)² (So et al. 2021, "Primer")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "relu2": ReLUSquared}  # the MLP's nonlinearity, by config name


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float, bias: bool, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.proj = nn.Linear(4 * d_model, d_model, bias=bias)
        self.proj.residual = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, attention: Attention, dropout: float, bias: bool, activation: str = "gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = attention
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, dropout, bias, activation)

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        a, state = self.attn(self.ln_1(x), state)
        x = x + a
        return x + self.mlp(self.ln_2(x)), state


class LAM(nn.Module):
    """Decoder-only language model.

    attention: a factory called as `attention(d_model=..., n_head=..., dropout=..., bias=..., rope=...,
        qk_norm=...)` once per layer (a class, or a `functools.partial` of one, as Hydra's `_partial_: true`
        builds).
    pos: "learned" absolute position embeddings (context limited to block_size) or "rope" rotary positions
        inside attention (no limit).
    activation: the MLP's nonlinearity, "gelu" (GPT-2), "relu" (the original transformer, Tiny_GPT) or "relu2"
        (relu squared, Primer).
    qk_norm: RMS-normalise each head's queries and keys, without weights, before positions (QK-norm).
    tie_head: the head shares the token embedding's weight (Press & Wolf 2017); False: a weight of its own.
    """

    def __init__(self, vocab_size: int, attention: Callable[..., Attention] = SoftmaxAttention,
                 n_layer: int = 4, n_head: int = 4, n_embd: int = 128, block_size: int = 64,
                 dropout: float = 0.0, bias: bool = False, pos: str = "learned", activation: str = "gelu",
                 qk_norm: bool = False, tie_head: bool = True):
        super().__init__()
        if pos not in ("learned", "rope"):
            raise ValueError(f"pos must be 'learned' or 'rope', got {pos!r}")
        for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.vocab_size, self.block_size, self.pos = vocab_size, block_size, pos
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd) if pos == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(n_embd, attention(d_model=n_embd, n_head=n_head, dropout=dropout, bias=bias,
                                    rope=pos == "rope", qk_norm=qk_norm), dropout, bias, activation)
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_head:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for module in self.modules():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if getattr(module, "residual", False):
                nn.init.normal_(module.weight, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_context(self) -> int | None:
        """Longest sequence the model can attend over, None if unbounded."""
        return self.block_size if self.wpe is not None else None

    def forward(self, idx: torch.Tensor, state: list | None = None) -> tuple[torch.Tensor, list]:
        """idx: (B, T) token ids following the tokens that `state` has seen. Returns (B, T, vocab) logits and
        the per-layer states after the last token."""
        offset = 0 if state is None else state[0].offset
        T = idx.shape[1]
        x = self.wte(idx)
        if self.wpe is not None:
            if offset + T > self.block_size:
                raise ValueError(f"sequence of {offset + T} tokens is longer than block_size={self.block_size}")
            x = x + self.wpe(torch.arange(offset, offset + T, device=idx.device))
        x = self.drop(x)
        states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if state is None else state[i])
            states.append(s)
        return self.lm_head(self.ln_f(x)), states
