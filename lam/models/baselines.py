"""Baselines from the seed projects: a bigram table and a fixed-window neural n-gram (Bengio et al. 2003)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Bigram(nn.Module):
    """logits(next | current) is a row of a vocab x vocab table."""

    max_context = None

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor, state=None) -> tuple[torch.Tensor, tuple]:
        return self.table(idx), ()  # needs no memory: the next call passes only the new tokens


class NGramState(NamedTuple):
    history: torch.Tensor  # (B, n-1) the last n-1 token ids seen (-1 where none yet)


class NGram(nn.Module):
    """logits(next | last n-1 tokens) from an MLP over their concatenated embeddings."""

    max_context = None

    def __init__(self, vocab_size: int, n: int = 4, n_embd: int = 64, hidden: int = 512, dropout: float = 0.0):
        super().__init__()
        if n < 2:
            raise ValueError(f"an n-gram model needs n >= 2, got {n}")
        self.vocab_size, self.n = vocab_size, n
        self.wte = nn.Embedding(vocab_size + 1, n_embd)  # the last row pads positions before the start
        self.mlp = nn.Sequential(
            nn.Linear((n - 1) * n_embd, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, vocab_size)
        )

    def forward(self, idx: torch.Tensor, state: NGramState | None = None) -> tuple[torch.Tensor, NGramState]:
        B, T = idx.shape
        history = idx.new_full((B, self.n - 1), -1) if state is None else state.history
        seq = torch.cat((history, idx), dim=1)
        padded = seq.masked_fill(seq < 0, self.vocab_size)
        windows = padded.unfold(1, self.n - 1, 1)[:, 1:]  # (B, T, n-1): tokens t-n+2 .. t for each position t
        logits = self.mlp(self.wte(windows).flatten(2))
        return logits, NGramState(seq[:, -(self.n - 1):])
