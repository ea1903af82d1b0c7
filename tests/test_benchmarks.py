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


def test_speed_mode_pairs_each_repeats_two_runs(tmp_path, monkeypatch):
    """The within-pair ratio divides the runs of one repeat, not the medians of each side: a host that is slow
    for a whole repeat slows both its runs and leaves their ratio alone."""
    plain_ms, lam_ms = iter([40.0, 80.0, 44.0]), iter([20.0, 64.0, 40.0])  # repeat 1 ran on a slow host

    def fake_launch(kind, spec):
        return {"ms_step": next(lam_ms if kind == "lam" else plain_ms), "rss_mib": 1.0}

    monkeypatch.setattr(train_speed, "launch", fake_launch)
    monkeypatch.setattr(train_speed, "matmul_peak", lambda threads: 100.0)
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["train_speed", "--attention", "linear", "--repeats", "3", "--json", str(out)])
    train_speed.main()
    assert json.loads(out.read_text())["pair_ratios"]["linear"] == pytest.approx([2.0, 1.25, 1.1])
