"""The learning-rate schedules, read off a real optimizer step by step."""

import pytest
import torch

from lam.training.schedule import warmup_cosine, warmup_stable_decay


def lrs(make, steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = make(optimizer, **kwargs)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_the_floor():
    lr = lrs(warmup_stable_decay, 12, warmup_steps=2, total_steps=10, decay_fraction=0.4, min_lr_ratio=0.25)
    assert lr[:2] == [1.0, 2.0]  # (step + 1) / warmup of the peak 2.0
    assert lr[2:7] == [2.0] * 5  # the plateau up to step 6 = 10 x (1 - 0.4)
    assert lr[6:11] == pytest.approx([2.0, 1.625, 1.25, 0.875, 0.5])  # a straight line to 0.25 x 2.0 at step 10
    assert lr[11] == pytest.approx(0.5)  # the floor after total_steps


def test_cosine_reaches_its_floor_at_total_steps():
    lr = lrs(warmup_cosine, 12, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    assert lr[:2] == [1.0, 2.0]
    assert lr[6] == pytest.approx(0.2 + 1.8 * 0.5)  # halfway through the cosine
    assert lr[10] == lr[11] == pytest.approx(0.2)
