"""Values on a command line mean what they say: a prompt with commas, quotes, accents or `${`, a path with
parentheses, reach the config exactly as typed; what Hydra's grammar reads as intended (sweeps, lists, flags,
quoted strings) passes unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import TINY_MODEL, compose_train
from lam.config import config_dir, quote_overrides
from lam.data.tokenizer import CharTokenizer
from lam.serving.build import build
from lam.serving.model import Model

TEXTS = ["O Romeo, Romeo!", "it's", "say \"hi\"", "a\\", "a\\'b", "'", "\\", "", "  two spaces  ", "1,2",
         "null", "a=b", "[x]", "{y}", "${x}", "\\${x}", "\\\\${x}", "${oc.env:HOME}", "日本, é ☃", "\\n\\n"]


@pytest.mark.parametrize("text", TEXTS)
def test_a_prompt_reads_back_exactly_as_typed(text):
    with initialize_config_dir(config_dir=str(config_dir() / "apps"), version_base="1.3"):
        cfg = compose("generate", overrides=quote_overrides([f"prompt={text}"], ["prompt"]))
    assert cfg.prompt == text


def test_an_unparseable_value_of_any_key_is_quoted_and_the_rest_pass_unchanged(tmp_path):
    cfg = compose_train(quote_overrides(["data=custom", "data.path=my notes (1).txt"]), tmp_path)
    assert cfg.data.path == "my notes (1).txt"
    kept = ["-m", "seed=1,2", "model.n_layer=[1,2]", "~logger", "+trainer.x=1", "--cfg", "job",
            "prompt='quoted, already'", "prompt=\"it's\"", "data.path=${oc.env:HOME}/x.txt"]
    assert quote_overrides(kept, ["prompt"]) == kept
    assert quote_overrides(["prompt='open"], ["prompt"]) == ["prompt='\\'open'"]


def tiny_model_file(tmp_path, characters: str) -> Path:
    tokenizer = CharTokenizer("".join(sorted(set(characters))))
    cfg = compose_train([*TINY_MODEL, "data.block_size=16"], tmp_path)
    config = OmegaConf.to_container(cfg.model, resolve=True)
    return Model(build(config, "test", vocab_size=tokenizer.vocab_size), tokenizer, config).save(tmp_path / "m.lam")


def test_generate_takes_a_prompt_with_commas_quotes_and_accents(tmp_path):
    prompt = "O Romeo, Romeo! 'tis é日本"
    tiny_model_file(tmp_path, prompt + "\n")
    done = subprocess.run([sys.executable, "-m", "lam.generate", f"model={tmp_path / 'm.lam'}", f"prompt={prompt}",
                           "max_new_tokens=4", "temperature=0"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(prompt) and len(done.stdout.rstrip("\n")) >= len(prompt)
    done = subprocess.run([sys.executable, "-m", "lam.generate", f"model={tmp_path / 'm.lam'}", "prompt=\\nO\\n",
                           "max_new_tokens=4", "temperature=0", "num_samples=2"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})  # the empty prompt's hint
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("\nO\n")


def test_generate_into_a_pipe_the_reader_leaves_ends_without_a_traceback(tmp_path):
    model = tiny_model_file(tmp_path, "abc\n")
    done = subprocess.run(f"{sys.executable} -m lam.generate model={model} prompt=a max_new_tokens=100000 "
                          "temperature=1 | head -c 1", shell=True, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.stdout == "a" and "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr
