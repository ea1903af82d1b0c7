"""Bad input: a clear one-line error, exit status 1, nothing half-written."""

import re
import subprocess
import sys

import pytest
import torch

import lam
from helpers import TINY, compose_train
from lam.config import path_is_custom
from lam.errors import UserError
from lam.export import export
from lam.generate import load_checkpoint, load_model
from lam.train import check_values, train


def train_on(path, tmp_path, *overrides):
    return train(compose_train([*TINY, "data=custom", f"data.path={path}", *overrides], tmp_path / "run"))


def test_missing_corpus_file(tmp_path):
    with pytest.raises(UserError, match="nothing.txt does not exist"):
        train_on(tmp_path / "nothing.txt", tmp_path)


def test_empty_corpus_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty.txt is empty"):
        train_on(tmp_path / "empty.txt", tmp_path)


def test_folder_without_text(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError, match=r"has no files matching '\*\*/\*.txt'"):
        train_on(tmp_path / "docs", tmp_path)


def test_non_utf8_file_names_the_byte(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") * 50)
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text: invalid byte 0xe9 at offset 3"):
        train_on(tmp_path / "latin1.txt", tmp_path)


def test_non_utf8_file_can_be_read_with_replacement(tmp_path, corpus):
    (tmp_path / "latin1.txt").write_bytes(corpus.read_bytes() + "café".encode("latin-1"))
    train_on(tmp_path / "latin1.txt", tmp_path, "data.errors=replace", "trainer.max_steps=2")
    _, tokenizer = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert tokenizer.encode("caf\ufffd")  # the byte é became U+FFFD, a character of the vocabulary


def test_block_size_longer_than_validation_split(tmp_path):
    (tmp_path / "short.txt").write_text("to be or not to be, that is the question\n" * 10)  # 41 val chars
    with pytest.raises(UserError, match=r"data.block_size=64 does not fit: the val split has only 41 tokens; "
                                        r"use data.block_size<=40 or more text"):
        train_on(tmp_path / "short.txt", tmp_path, "data.block_size=64")
    with pytest.raises(UserError, match=r"the val split has only 41 tokens; use data.block_size<=40 or more"):
        train_on(tmp_path / "short.txt", tmp_path, "data.block_size=1000")  # longer than the train split too
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "tokenizer.json").exists()  # the run folder holds only its log
    (tmp_path / "tiny.txt").write_text("to be or")  # 1 val token: no block size fits
    with pytest.raises(UserError, match=r"the val split has only 1 tokens; use more text$"):
        train_on(tmp_path / "tiny.txt", tmp_path, "data.block_size=2")


def test_sampling_prompt_outside_the_vocabulary_stops_before_training(tmp_path, corpus):
    with pytest.raises(UserError, match=r"callbacks.samples.prompts: 'ROMEO:': character 'R' is not in the "
                                        r"tokenizer's vocabulary"):
        train_on(corpus, tmp_path, "callbacks.samples.prompts=[ROMEO:]")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_default_prompt_on_a_text_without_newlines_names_prompts_that_work(tmp_path):
    """The default prompt is a newline; a text with none gets a one-line error naming a prompt of its own."""
    (tmp_path / "flat.txt").write_text("to be or not to be, that is the question. " * 40)
    with pytest.raises(UserError) as error:
        train_on(tmp_path / "flat.txt", tmp_path, "trainer.max_steps=2")
    assert str(error.value).startswith("callbacks.samples.prompts: '\\n': character '\\n' is not in")
    assert str(error.value).endswith("e.g. callbacks.samples.prompts=[a], or callbacks.samples=null for no samples")
    train_on(tmp_path / "flat.txt", tmp_path, "trainer.max_steps=2", "callbacks.samples.prompts=[a]")  # it works


def test_checkpoint_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_file_that_is_not_a_lam_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="not a LAM checkpoint"):
        load_checkpoint(tmp_path / "other.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.ckpt")


def test_a_model_file_a_checkpoint_and_a_folder_given_for_one_another_say_what_they_are(tmp_path, corpus):
    train_on(corpus, tmp_path, "trainer.max_steps=2")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    export(ckpt, tmp_path / "m.lam")
    with pytest.raises(UserError, match=rf"^{tmp_path}/m.lam is a model file, not a checkpoint: .* take it as "
                                        rf"model={tmp_path}/m.lam, lam.train as init_from={tmp_path}/m.lam$"):
        load_checkpoint(tmp_path / "m.lam")
    with pytest.raises(UserError, match=rf"^{ckpt} is a checkpoint, not a model file: give it as ckpt={ckpt}, "):
        lam.load(ckpt)
    with pytest.raises(UserError, match=rf"^checkpoint {tmp_path / 'run'} is a folder; give a file in it, e\.g\. "
                                        rf"{ckpt.parent}/\w+\.ckpt$"):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(UserError, match=r"is a folder; it holds no .ckpt file$"):
        load_checkpoint(tmp_path / "run" / "csv")
    with pytest.raises(UserError, match=rf"^model file {tmp_path} is a folder$"):
        lam.load(tmp_path)


def test_checkpoint_that_does_not_match_its_model(tmp_path, corpus):
    train_on(corpus, tmp_path, "trainer.max_steps=2")
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["lam"]["config"]["model"]["n_embd"] = 64
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="does not match its model config: size mismatch"):
        load_checkpoint(path)


def test_resuming_from_a_missing_or_other_models_checkpoint(tmp_path, corpus):
    """ckpt_path= is checked before training: a one-line error, not Lightning's traceback."""
    with pytest.raises(UserError, match="checkpoint nowhere.ckpt does not exist"):
        train_on(corpus, tmp_path, "ckpt_path=nowhere.ckpt")
    train_on(corpus, tmp_path, "trainer.max_steps=2")
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match=r"was written for another model: model.n_embd is 32 there and 64 here"):
        train_on(corpus, tmp_path, "model.n_embd=64", f"ckpt_path={path}")
    other_vocabulary = tmp_path / "other.txt"  # the same model config, another vocabulary: the shapes differ
    other_vocabulary.write_text(corpus.read_text() + "XYZ")
    with pytest.raises(UserError, match=r"does not match this model: net.wte.weight is \(\d+, 32\) there and "
                                        r"\(\d+, 32\) here"):
        train_on(other_vocabulary, tmp_path, f"ckpt_path={path}")


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_prints_one_line_and_exits_1(tmp_path):
    result = cli("lam.train", "data=custom", f"data.path={tmp_path / 'nope.txt'}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.txt'} does not exist"
    assert "Traceback" not in result.stderr
    (log,) = tmp_path.glob("outputs/*/*/train.log")  # the run folder's log says why it ended too
    assert f"error: {tmp_path / 'nope.txt'} does not exist" in log.read_text()
    result = cli("lam.generate", "ckpt=missing.ckpt", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip() == "error: checkpoint missing.ckpt does not exist"


def test_cli_unset_mandatory_value_is_one_line(tmp_path):
    result = cli("lam.train", "data=custom", *TINY, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: data.path has no value: give one on the command line, data.path=..."


def test_cli_unknown_config_option_is_hydra_error(tmp_path):
    result = cli("lam.train", "attention=quadratic", cwd=tmp_path)
    assert result.returncode == 1
    assert "Could not find 'attention/quadratic'" in result.stderr
    assert "Available options" in result.stderr and "linear" in result.stderr
    for group in ("experiment", "hparams_search"):  # preset groups too, which are empty by default
        with pytest.raises(UserError, match=f"^{group}=nope is not an option of conf/{group}/: "):
            compose_train([f"{group}=nope"], tmp_path / "run")


def test_a_data_path_alone_is_a_custom_corpus(tmp_path):
    assert path_is_custom(["-m", "data.path=x.txt", "seed=1"]) == ["-m", "data.path=x.txt", "data=custom", "seed=1"]
    assert path_is_custom(["data=stan", "data.path=x.txt"]) == ["data=stan", "data.path=x.txt"]
    assert path_is_custom(["seed=1"]) == ["seed=1"]
    result = cli("lam.train", "data.path=x.txt", "--cfg", "job", "--package", "data", cwd=tmp_path)
    assert result.returncode == 0 and "TextDataModule.from_path" in result.stdout and "path: x.txt" in result.stdout


def test_resuming_another_attention_or_depth_names_the_differing_keys(tmp_path, corpus):
    """Same shapes (linear and softmax attention) or more layers there: one line naming the model keys that
    differ, before training."""
    train_on(corpus, tmp_path, "trainer.max_steps=2", "model.n_layer=2")
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match=r"^ckpt_path=.*last.ckpt was written for another model: "
                                        r"model.attention._target_ is .*LinearAttention there and "
                                        r".*SoftmaxAttention here; resume with "):  # not the keys of other classes
        train_on(corpus, tmp_path, "model.n_layer=2", "attention=softmax", f"ckpt_path={path}")
    with pytest.raises(UserError, match=r"another model: model.n_layer is 2 there and 1 here; resume with "):
        train_on(corpus, tmp_path, "model.n_layer=1", f"ckpt_path={path}")


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr=-1 must be > 0"),
    ("optim.lr=0", "optim.lr=0 must be > 0"),
    ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
    ("data.block_size=-3", "data.block_size=-3 must be an integer >= 1"),
    ("data.eval_batches=0", "data.eval_batches=0 must be an integer >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be an integer >= 1"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be an integer >= 1"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("threads=0", "threads takes an integer from 1 up, or null, got 0"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 must be an integer >= 1"),
    ("seed=abc", "seed=abc must be an integer"),
    ("tokenizer=bpe tokenizer.vocab_size=abc", "tokenizer.vocab_size=abc must be an integer"),
    ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
    ("scheduler.warmup_steps=-1", "scheduler.warmup_steps=-1 must be an integer >= 0"),
    ("scheduler.min_lr_ratio=2", "scheduler.min_lr_ratio=2 must be between 0 and 1"),
    ("scheduler=wsd scheduler.decay_fraction=0", "scheduler.decay_fraction=0 must be in (0, 1]"),
    ("scheduler=wsd scheduler.decay_fraction=1.5", "scheduler.decay_fraction=1.5 must be in (0, 1]"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 must be >= 0, or null"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be two numbers in [0, 1)"),
    ("optim.betas=0.9", "optim.betas=0.9 must be two numbers in [0, 1)"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
    ("trainer.precision=bogus", "trainer.precision=bogus must be auto (the CPU trainer's default), 32-true, "),
    ("trainer.precision=8", "trainer.precision=8 must be auto"),
    ("compile=maybe", "compile=maybe must be true or false"),
    ("trainer.enable_progress_bar=2", "trainer.enable_progress_bar=2 must be true or false"),
    ("trainer.accelerator=bogus", "trainer.accelerator=bogus must be cpu, gpu, cuda, mps, tpu or auto"),
    # what Lightning and LAM's callbacks refuse, named by their config key
    ("trainer.devices=0", "trainer: `Trainer(devices=0)` value is not a valid input"),
    ("trainer.strategy=bogus", "trainer: You selected an invalid strategy name: `strategy='bogus'`"),
    ("callbacks.progress_bar.refresh_interval_s=-1", "callbacks.progress_bar: refresh_interval_s must be >= 0, got -1"),
    # what the model's constructors refuse
    ("model.n_head=3", "model: n_head must be >= 1 and divide d_model=32, got n_head=3"),
    ("model.n_head=0", "model: n_head must be >= 1 and divide d_model=32, got n_head=0"),
    ("model.n_layer=0", "model: n_layer must be an integer >= 1, got 0"),
    ("model.n_embd=0", "model: n_embd must be an integer >= 1, got 0"),
    ("model.pos=abs", "model: pos must be 'learned' or 'rope', got 'abs'"),
    ("model.block_size=16", "model.block_size=16 is shorter than data.block_size=32: learned positions reach "
     "model.block_size tokens; set data.block_size<=16 (model.block_size follows it) or model.pos=rope"),
    ("model.dropout=1.5", "model: dropout probability has to be between 0 and 1"),
    ("attention.chunk_size=0", "model: chunk_size must be an integer >= 1, got 0"),
    ("attention=window attention.window=0", "model: window must be >= 1, got 0"),
])
def test_values_that_cannot_work_are_refused_by_key(tmp_path, corpus, override, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        train_on(corpus, tmp_path, *override.split())
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_shorter_position_table_than_the_windows_works_with_rotary_positions(tmp_path, corpus):
    assert train_on(corpus, tmp_path, "model.block_size=16", "model.pos=rope", "trainer.max_steps=2") is not None


@pytest.mark.parametrize("precision", ["auto", "32-true", "32", "bf16-mixed", "bf16", "16-mixed", "64-true"])
def test_precisions_lightning_takes_pass_the_value_checks(tmp_path, precision):
    check_values(compose_train([f"trainer.precision={precision}"], tmp_path))


def test_cli_bad_value_is_one_line(tmp_path, corpus):
    result = cli("lam.train", *TINY, "data=custom", f"data.path={corpus}", "optim.lr=-1", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: optim.lr=-1 must be > 0 (the learning rate)"


def test_a_device_or_accelerator_this_machine_lacks_is_one_line(tmp_path, corpus, monkeypatch):
    from lam.config import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    check_device("cpu")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=rf"^device={device}: this machine has no CUDA GPU \(torch .*\); use "
                                            r"device=cpu$"):
            load_model(None, tmp_path / "missing.ckpt", device)  # before the file is looked for
    with pytest.raises(UserError, match=r"^device=tpu is not a device; use cpu, cuda, cuda:<index> or mps$"):
        check_device("tpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_device("cuda:0")
    with pytest.raises(UserError, match=r"^device=cuda:1: this machine has 1 CUDA GPU\(s\)"):
        check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError, match=r"^trainer.accelerator=gpu: this machine has no CUDA GPU \(torch .*\); "
                                        r"use trainer=cpu$"):
        train_on(corpus, tmp_path, "trainer=gpu")
    assert not (tmp_path / "run" / "checkpoints").exists()
