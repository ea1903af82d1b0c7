"""Learning-rate schedules, as factors of the peak lr: linear warmup, then a cosine decay to a floor (GPT-2 /
nanoGPT), or a constant plateau and a linear decay at the end (warmup-stable-decay; Hu et al. 2024, MiniCPM,
arXiv:2404.06395)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> LambdaLR:
    """lr(step) = lr · factor: (step + 1)/warmup during warmup, then a cosine from 1 down to min_lr_ratio at
    total_steps, and min_lr_ratio after it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_stable_decay(optimizer: Optimizer, warmup_steps: int, total_steps: int, decay_fraction: float = 0.2,
                        min_lr_ratio: float = 0.0) -> LambdaLR:
    """lr(step) = lr · factor: (step + 1)/warmup during warmup, 1 until the last `decay_fraction` of total_steps,
    then a straight line down to min_lr_ratio at total_steps, and min_lr_ratio after it."""
    decay_start = max(warmup_steps, round(total_steps * (1 - decay_fraction)))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, max(0, step - decay_start) / max(1, total_steps - decay_start))
        return 1 - (1 - min_lr_ratio) * progress

    return LambdaLR(optimizer, factor)
