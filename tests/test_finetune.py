"""Fine-tuning end to end: init_from= starts from a checkpoint's weights, tokenizer and architecture; lora=
trains adapters only; the result loads as a plain LAM."""

import json
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import TINY, TINY_RUN, column, compose_train, read_metrics
import lam
from lam.errors import UserError
from lam.export import export
from lam.generate import load_checkpoint
from lam.models import LAM
from lam.train import train
from lam.training.finetune import adapt, read_start
from lam.training.runs import load_run

pytestmark = pytest.mark.slow

FINE_TUNE = [*TINY_RUN, "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.precision=32-true"]


def run(out, corpus, *overrides, base=TINY):
    cfg = compose_train([*base, "data=custom", f"data.path={corpus}", "trainer.precision=32-true", *overrides],
                        out)
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    """A tiny model trained for 10 steps: the model the tests fine-tune."""
    return run(tmp_path_factory.mktemp("base"), corpus, "trainer.max_steps=10")


def weights(path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, weights_only=True)
    return {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items()}


@pytest.mark.parametrize("kind", ["checkpoint", "model file"])
def test_init_from_loads_exactly_the_files_weights(base, tmp_path, kind):
    path = base
    if kind == "model file":
        path = tmp_path / "base.lam"
        export(base, path)
    start = read_start(path)
    net = instantiate(start.model, vocab_size=start.tokenizer.vocab_size)
    start.load_into(net)
    assert net.state_dict().keys() == weights(base).keys()
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, weights(base)[name]), name


def test_fine_tune_trains_from_step_0_with_the_files_model_and_tokenizer(base, corpus, tmp_path):
    other = tmp_path / "other.txt"  # new text, without the capitals: its own alphabet would be smaller
    other.write_text(corpus.read_text()[::-1].lower())
    # the run's own model config (4 layers of 128) gives way to the file's (1 layer of 32)
    tuned = run(tmp_path / "tuned", other, f"init_from={base}", base=FINE_TUNE)
    checkpoint = torch.load(tuned, weights_only=True)
    assert checkpoint["global_step"] == 3  # a fresh start, not the base's step 10 + 3
    assert checkpoint["lam"]["config"]["model"] == torch.load(base, weights_only=True)["lam"]["config"]["model"]
    assert checkpoint["lam"]["tokenizer"] == torch.load(base, weights_only=True)["lam"]["tokenizer"]
    before, after = weights(base), weights(tuned)
    assert after.keys() == before.keys()
    # 3 small steps away from the file's weights (a fresh init would be ~0.1 away), and each matrix moved
    assert all((after[k] - before[k]).abs().max() < 0.02 for k in before)
    assert all(not torch.equal(after[k], before[k]) for k in before if k.endswith(("qkv.weight", "fc.weight")))


def test_lora_fine_tune_trains_only_adapters_and_loads_as_a_plain_lam(base, corpus, tmp_path):
    tuned = run(tmp_path / "lora", corpus, f"init_from={base}", "lora=default", "lora.r=2", base=FINE_TUNE)
    before, after = weights(base), weights(tuned)
    adapters = {k for k in after if ".lora_" in k}
    assert adapters and after.keys() - adapters == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the base weights stayed where they were
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if k.endswith("lora_B"))

    net, _ = load_checkpoint(tuned)  # adapters merged: the plain model's weights, and they differ from the base
    assert type(net) is LAM and net.state_dict().keys() == before.keys()
    assert not torch.equal(net.state_dict()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])

    export(tuned, tmp_path / "tuned.lam")
    exported = lam.load(tmp_path / "tuned.lam")  # an ordinary model file, with the adapters merged
    adapted = instantiate(read_start(base).model, vocab_size=exported.tokenizer.vocab_size)
    adapt(adapted, {"r": 2})
    adapted.load_state_dict(after)
    x = torch.tensor([exported.tokenizer.encode("The king speaks")])
    assert type(exported.net) is LAM and exported.net.state_dict().keys() == before.keys()
    torch.testing.assert_close(exported.net(x)[0], adapted.eval()(x)[0], atol=1e-5, rtol=0)
    # and it starts a fine-tune of its own
    assert run(tmp_path / "again", corpus, f"init_from={tmp_path / 'tuned.lam'}", base=FINE_TUNE).is_file()


def test_new_characters_are_one_clear_error_and_errors_replace_reads_them(base, tmp_path):
    text = tmp_path / "new.txt"
    text.write_text("The king speaks: zest!\n" * 200)
    with pytest.raises(UserError, match=r"3 characters outside the tokenizer's alphabet of \d+: '!' ':' 'z'; "
                                        r"data.errors=replace reads each as ' '"):
        run(tmp_path / "strict", text, f"init_from={base}", base=FINE_TUNE)
    assert weights(run(tmp_path / "replace", text, f"init_from={base}", "data.errors=replace", base=FINE_TUNE))


@pytest.mark.parametrize("override", ["model.n_layer=2", "attention=softmax", "model=bigram"])
def test_another_architecture_is_refused(base, corpus, tmp_path, override):
    with pytest.raises(UserError, match=f"{override} is refused: init_from=.* fixes the architecture"):
        run(tmp_path / "refused", corpus, f"init_from={base}", override, base=FINE_TUNE)


def test_the_run_folder_names_the_model_init_from_gave_not_the_composed_one(corpus, tmp_path):
    """A fine-tune of a softmax model, composed with the default attention (linear): its .hydra/config.yaml,
    metrics.json, wandb name and lam.compare all say softmax, the attention that was trained."""
    softmax = run(tmp_path / "softmax", corpus, "attention=softmax", "trainer.max_steps=2")
    out = tmp_path / "tuned"
    subprocess.run([sys.executable, "-m", "lam.train", *FINE_TUNE, "data=custom", f"data.path={corpus}",
                    f"init_from={softmax}", "logger=wandb", f"hydra.run.dir={out}"], check=True, capture_output=True)
    saved = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert saved.attention._target_ == "lam.models.attention.SoftmaxAttention"
    assert saved.model.n_embd == 32 and OmegaConf.to_container(saved.model)["attention"] == "${attention}"
    assert json.loads((out / "metrics.json").read_text())["trained"] == {"model": "lam", "attention": "softmax"}
    assert load_run(out, "val/loss").choices["attention"] == "softmax"
    (wandb_run,) = (out / "wandb").glob("offline-run-*/*.wandb")
    assert b"lam-softmax-custom-s" in wandb_run.read_bytes()


def test_a_missing_start_is_one_line_that_names_init_from(corpus, tmp_path):
    with pytest.raises(UserError, match=r"^init_from=\S*nothere.lam does not exist: give a model file"):
        run(tmp_path / "missing", corpus, f"init_from={tmp_path / 'nothere.lam'}", base=FINE_TUNE)
    assert not (tmp_path / "missing" / "checkpoints").exists()


def test_an_interrupted_fine_tune_resumes_with_its_own_command_and_ckpt_path(base, corpus, tmp_path):
    command = [f"init_from={base}", "lora=default", "lora.r=2"]
    first = run(tmp_path / "first", corpus, *command, base=FINE_TUNE)
    resumed = run(tmp_path / "resumed", corpus, *command, f"ckpt_path={first}", "trainer.max_steps=5",
                  base=FINE_TUNE)
    assert torch.load(resumed, weights_only=True)["global_step"] == 5
    assert [step for step, _ in column(read_metrics(tmp_path / "resumed"), "train/loss")] == [4, 5]


def test_windows_longer_than_the_files_positions_shrink_to_them_unless_asked_for(base, corpus, tmp_path):
    """The base learned 32 positions; the run's data would take 64 (the default) or the command line says 64."""
    unset = [o for o in FINE_TUNE if not o.startswith("data.block_size=")]
    tuned = run(tmp_path / "tuned", corpus, f"init_from={base}", base=unset)
    assert torch.load(tuned, weights_only=True)["lam"]["config"]["data"]["block_size"] == 32
    with pytest.raises(UserError, match=r"^data.block_size=64 is longer than the 32 positions the model of "
                                        r"init_from=.* has learned; use data.block_size<=32$"):
        run(tmp_path / "refused", corpus, f"init_from={base}", "data.block_size=64", base=unset)
