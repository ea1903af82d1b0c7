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
