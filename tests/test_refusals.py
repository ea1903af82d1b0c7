"""Loading a file never runs code from it: each hostile or broken checkpoint is refused with one line, exit 1,
and nothing it carries is executed (the marker file its payload would create does not exist)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lam.data.tokenizer import CharTokenizer, load_tokenizer
from lam.errors import UserError
from lam.generate import load_model
from lam.serving.build import build
from lam.training.checkpoint import read_checkpoint

MODEL = {"_target_": "lam.models.LAM", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8,
         "attention": {"_target_": "lam.models.attention.SoftmaxAttention", "_partial_": True}}
TOKENIZER = CharTokenizer("abc ").state_dict()


class Payload:
    """Unpickling it runs `touch marker` (as a file someone shares might)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_checkpoint(path: Path, model=MODEL, tokenizer=TOKENIZER, **extra) -> Path:
    torch.save({"state_dict": {}, "lam": {"config": {"model": model}, "tokenizer": tokenizer}, **extra}, path)
    return path


def hostile_files(tmp_path: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """name: (file, what its one-line error says)."""
    touch = ["touch", str(marker)]
    good = write_checkpoint(tmp_path / "good.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign_text = tmp_path / "notes.ckpt"
    foreign_text.write_text("hello\n")
    return {
        "pickle with code": (write_checkpoint(tmp_path / "evil.ckpt", payload=Payload(marker)),
                             "holds more than tensors and plain values"),
        "foreign model target": (write_checkpoint(tmp_path / "target.ckpt",
                                                  model={"_target_": "subprocess.run", "args": touch}),
                                 "model._target_ is 'subprocess.run', not one of LAM's"),
        "foreign nested target": (write_checkpoint(tmp_path / "nested.ckpt", model={
            **MODEL, "attention": {"_target_": "subprocess.run", "args": touch, "_partial_": True}}),
                                  "model.attention._target_ is 'subprocess.run'"),
        "hydra call key": (write_checkpoint(tmp_path / "args.ckpt", model={**MODEL, "_args_": touch}),
                           "model._args_ is not a key LAM writes"),
        "foreign tokenizer class": (write_checkpoint(tmp_path / "tok.ckpt",
                                                     tokenizer={"class": "subprocess.Popen", "args": touch}),
                                    "tokenizer class 'subprocess.Popen' is not one of LAM's"),
        "truncated": (truncated, "is not a readable checkpoint"),
        "not a checkpoint": (foreign_text, "is not a readable checkpoint"),
        "not LAM's": (torch.save({"state_dict": {}}, tmp_path / "other.ckpt") or tmp_path / "other.ckpt",
                      "is not a LAM checkpoint"),
    }


CASES = ["pickle with code", "foreign model target", "foreign nested target", "hydra call key",
         "foreign tokenizer class", "truncated", "not a checkpoint", "not LAM's"]


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_or_broken_checkpoint_is_refused_in_one_line(case, tmp_path):
    marker = tmp_path / "marker"
    path, message = hostile_files(tmp_path, marker)[case]
    with pytest.raises(UserError, match=re.escape(message)) as refused:
        load_model(None, str(path))
    assert len(str(refused.value).splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("case", ["pickle with code", "foreign nested target", "truncated"])
def test_generate_refuses_it_and_exits_1(case, tmp_path):
    marker = tmp_path / "marker"
    path, message = hostile_files(tmp_path, marker)[case]
    result = subprocess.run([sys.executable, "-m", "lam.generate", f"ckpt={path}", "max_new_tokens=2"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not marker.exists()


def test_the_payload_would_run_without_weights_only(tmp_path):
    """The pickle case is a real one: torch.load without weights_only creates the marker."""
    marker = tmp_path / "marker"
    path, _ = hostile_files(tmp_path, marker)["pickle with code"]
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_checkpoint_of_plain_values_reads_and_builds(tmp_path):
    checkpoint = read_checkpoint(write_checkpoint(tmp_path / "good.ckpt"))
    net = build(checkpoint["lam"]["config"]["model"], "good.ckpt", vocab_size=4)
    assert type(net).__name__ == "LAM" and net.blocks[0].attn.__class__.__name__ == "SoftmaxAttention"
    assert load_tokenizer(checkpoint["lam"]["tokenizer"]).chars == "abc "


def test_a_tokenizer_state_with_unknown_arguments_is_refused():
    with pytest.raises(UserError, match="does not fit"):
        load_tokenizer({**TOKENIZER, "shell": "rm -rf"})


@pytest.mark.parametrize("model, message", [
    ({**MODEL, "_partial_": True}, "does not name a network class"),
    ([MODEL], "does not name a network class"),
    ({**MODEL, "pos": "sideways"}, "does not build (ValueError: pos must be"),
    ({**MODEL, "n_head": {"_target_": "lam.models.LAM", "depth": 3}}, "does not build (TypeError"),
])
def test_a_model_config_that_does_not_build_a_network_is_one_line(model, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        build(model, "x.ckpt", vocab_size=4)
