"""lam.eval measures a model by training's validation protocol: on a run's own validation split its loss is the
run's final val/loss, from the model file as from the checkpoint."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from helpers import TINY, compose_train
from lam.config import config_dir
from lam.errors import UserError
from lam.eval import main, training_corpus
from lam.export import export
from lam.train import train

pytestmark = pytest.mark.slow

DATA = ["data.batch_size=4", "data.eval_batches=2"]  # TINY's validation windows (its block size is the model's)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_train([*TINY, "data=custom", f"data.path={corpus}", "trainer.precision=32-true",
                         "trainer.max_steps=20"], out)
    train(cfg)
    return out


def test_eval_loss_on_the_runs_validation_split_is_its_final_val_loss(trained, corpus, tmp_path, capsys):
    val_loss = json.loads((trained / "metrics.json").read_text())["val_loss"]
    export(trained / "checkpoints" / "last.ckpt", tmp_path / "m.lam")
    main([f"model={tmp_path / 'm.lam'}", "data=custom", f"data.path={corpus}", *DATA, f"out={tmp_path / 'e.json'}"])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["loss"] == pytest.approx(val_loss, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-6)
    assert result["bits_per_char"] == pytest.approx(val_loss / math.log(2), rel=1e-6)  # one character a token
    assert result["tokens"] == 2 * 4 * 32 and f"val loss {val_loss:.4f}" in capsys.readouterr().out

    main([f"ckpt={trained / 'checkpoints' / 'last.ckpt'}", "data=custom", f"data.path={corpus}", *DATA,
          f"out={tmp_path / 'c.json'}"])
    assert json.loads((tmp_path / "c.json").read_text())["loss"] == result["loss"]


def test_a_data_path_alone_is_a_custom_corpus(trained, corpus, tmp_path):
    """The record's corpus is given up for the path: a file of other text (the corpus backwards) gives another
    loss."""
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    export(trained / "checkpoints" / "last.ckpt", tmp_path / "m.lam")
    main([f"model={tmp_path / 'm.lam'}", f"data.path={other}", *DATA, f"out={tmp_path / 'p.json'}"])
    main([f"model={tmp_path / 'm.lam'}", "data=custom", f"data.path={other}", *DATA, f"out={tmp_path / 'c.json'}"])
    main([f"model={tmp_path / 'm.lam'}", *DATA, f"out={tmp_path / 'r.json'}"])
    loss = json.loads((tmp_path / "p.json").read_text())["loss"]
    assert loss == json.loads((tmp_path / "c.json").read_text())["loss"]
    assert loss != json.loads((tmp_path / "r.json").read_text())["loss"]


def test_an_override_the_config_cannot_take_is_one_line(trained, tmp_path, capsys):
    export(trained / "checkpoints" / "last.ckpt", tmp_path / "m.lam")
    for override, message in [("bogus=1", "bogus is not a key of this config; python -m lam.train --cfg job "
                                          "prints the keys there are"),
                              ("data=nope", "data=nope is not an option of conf/data/: custom, shakespeare, stan")]:
        with pytest.raises(SystemExit) as exit:
            main([f"model={tmp_path / 'm.lam'}", override, f"out={tmp_path / 'e.json'}"])
        assert exit.value.code == 1 and capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "e.json").exists()


def test_windows_past_the_learned_positions_are_one_line(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([f"ckpt={trained / 'checkpoints' / 'last.ckpt'}", "data.block_size=64", f"out={tmp_path / 'e.json'}"])
    assert exit.value.code == 1 and capsys.readouterr().err.strip() == \
        f"error: checkpoint {trained / 'checkpoints' / 'last.ckpt'} learned positions for 32 tokens, so " \
        "data.block_size=64 is too long: set data.block_size<=32"
    assert not (tmp_path / "e.json").exists()


def test_eval_refuses_both_or_neither_model_and_ckpt(tmp_path, capsys):
    for argv in ([], ["model=a.lam", "ckpt=b.ckpt"]):
        with pytest.raises(SystemExit) as exit:
            main([*argv, f"out={tmp_path / 'e.json'}"])
        assert exit.value.code == 1 and "give the model to use" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


def test_a_runs_checkpoints_read_with_weights_only(trained):
    """What lam.train stores (Lightning's entries and LAM's) is tensors and plain values."""
    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = torch.load(trained / "checkpoints" / name, weights_only=True)
        assert json.loads(json.dumps(checkpoint["lam"])) == checkpoint["lam"]
        assert checkpoint["lam"]["tokenizer"]["class"] == "lam.data.tokenizer.CharTokenizer"


def test_eval_refuses_an_out_in_a_missing_folder_or_a_folder_before_evaluating(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["model=missing.lam", f"out={tmp_path / 'no' / 'e.json'}"])
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: out={tmp_path / 'no' / 'e.json'}: folder {tmp_path / 'no'} " \
                                              "does not exist"
    with pytest.raises(SystemExit) as exit:
        main(["model=missing.lam", f"out={tmp_path}"])
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: out={tmp_path} is a folder; give a file name, e.g. " \
                                              f"out={tmp_path / 'eval.json'}"


def test_eval_without_a_corpus_reads_the_one_the_model_was_trained_on(trained, tmp_path):
    val_loss = json.loads((trained / "metrics.json").read_text())["val_loss"]
    export(trained / "checkpoints" / "last.ckpt", tmp_path / "m.lam")
    for source in (f"model={tmp_path / 'm.lam'}", f"ckpt={trained / 'checkpoints' / 'last.ckpt'}"):
        assert main([source, *DATA, f"out={tmp_path / 'e.json'}"]) is None
        assert json.loads((tmp_path / "e.json").read_text())["loss"] == pytest.approx(val_loss, rel=1e-6)


def test_the_training_corpus_is_a_data_group_a_custom_file_or_an_error_naming_it(tmp_path, corpus):
    stan = OmegaConf.load(config_dir() / "data" / "stan.yaml").url
    assert training_corpus(SimpleNamespace(record={"corpus": stan}), "m") == ["data=stan"]
    assert training_corpus(SimpleNamespace(record={"corpus": str(corpus)}), "m") == \
        ["data=custom", f"data.path='{corpus}'"]
    assert training_corpus(SimpleNamespace(record={}), "m") == []
    with pytest.raises(UserError, match=r"^m was trained on .*gone.txt, which is not found from here; give the "
                                        r"corpus: data=custom data.path=<file>"):
        training_corpus(SimpleNamespace(record={"corpus": str(tmp_path / "gone.txt")}), "m")
