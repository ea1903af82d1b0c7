"""The training-speed benchmark runs end to end on a few steps (its figures live in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import train_speed


@pytest.mark.slow
def test_profile_mode_profiles_the_same_steady_state_steps_on_both_sides(tmp_path, monkeypatch):
    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", ["train_speed", "--mode", "profile", "--attention", "softmax", "--steps", "5",
                                      "--warmup", "2", "--repeats", "1", "--json", str(out)])
    train_speed.main()
    runs = json.loads(out.read_text())["softmax"]
    for kind in ("lam", "plain"):
        (run,) = runs[kind]
        assert run["steps"] == 3  # steps 2, 3 and 4: after the warmup, before validation
        assert 0 < run["ops_ms"] < run["ms_step"]  # the kernels' share of the wall time
        assert "aten::mm" in run["top_ops"]
    assert "aten::_fused_adamw_" in runs["lam"][0]["top_ops"]  # LAM's default optimizer, not the plain loop's
    assert "aten::_fused_adamw_" not in runs["plain"][0]["top_ops"]


def test_decode_times_its_contexts_in_turns(monkeypatch):
    """benchmarks.decode's per-token times: one per context, each from `tokens` - 1 steps after the prompt's
    pass, the contexts taking turns (so a drift in the machine's speed reaches every context alike)."""
    from benchmarks import decode

    order = []

    def fake_stream(net, prompt, tokens, **options):
        for i in range(tokens):
            order.append((prompt.shape[1], i))
            yield None

    monkeypatch.setattr(decode, "stream", fake_stream)
    ms = decode.per_token_ms(None, [3, 5], 17, rounds=4)
    assert len(ms) == 2 and all(m >= 0 for m in ms)
    assert order[:2] == [(3, 0), (5, 0)]  # the prompts' passes first
    steps = order[2:]
    assert sorted(steps) == [(L, i) for L in (3, 5) for i in range(1, 17)]  # every step after the first, once
    assert steps[:4] == [(3, i) for i in range(1, 5)] and steps[4:8] == [(5, i) for i in range(1, 5)]
    assert [L for L, _ in steps].count(3) == 16 and steps[-1] == (5, 16)
