"""End to end: train a tiny model for a few steps on the CPU, checkpoint, resume, generate."""

import io
import json
import signal

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from helpers import TINY, TINY_MODEL, TINY_RUN, column, compose_train, read_metrics
from lam.generate import load_checkpoint, sample
from lam.train import train

pytestmark = pytest.mark.slow


def run(tmp_path, corpus, *overrides, name="run", tiny=TINY):
    out = tmp_path / name
    cfg = compose_train([*tiny, "data=custom", f"data.path={corpus}", *overrides], out)
    return train(cfg), out


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_training_learns_checkpoints_and_generates(attention, tmp_path, corpus):
    overrides = [f"attention={attention}", "trainer.precision=32-true"]  # the loss recomputed below in fp32
    val_loss, out = run(tmp_path, corpus, *overrides)
    rows = read_metrics(out)
    train_loss = column(rows, "train/loss")
    val = column(rows, "val/loss")
    assert [s for s, _ in val] == [10, 20, 30]  # validated every 10 steps, at the steps done
    assert val[-1][1] < val[0][1] - 0.3 and train_loss[-1][1] < train_loss[0][1] - 0.5
    assert {"lr", "grad_norm", "tokens_per_sec"} <= set(rows[0])

    metrics = json.loads((out / "metrics.json").read_text())
    assert val_loss == metrics["val_loss"] == pytest.approx(val[-1][1])
    assert metrics["steps"] == 30 and metrics["tokens_seen"] == 30 * 4 * 32
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    assert json.loads((out / "samples.jsonl").read_text().splitlines()[-1])["step"] == 30

    net, tokenizer = load_checkpoint(out / "checkpoints" / "last.ckpt")
    cfg = compose_train([*TINY, "data=custom", f"data.path={corpus}", *overrides], out)
    assert validation_loss(net, cfg) == pytest.approx(val_loss, rel=1e-5)  # last.ckpt holds the final weights

    printed = io.StringIO()
    text = sample(net, tokenizer, "The king", 25, out=printed, temperature=0)
    ids = tokenizer.encode("The king")
    with torch.no_grad():  # greedy decoding, recomputed here over the last block_size tokens
        for _ in range(25):
            ids.append(int(net(torch.tensor([ids[-cfg.data.block_size:]]))[0][0, -1].argmax()))
    assert text == tokenizer.decode(ids[len("The king"):]) and printed.getvalue() == f"The king{text}\n"


def validation_loss(net: torch.nn.Module, cfg) -> float:
    """The mean next-token loss of `net` over the validation windows of the run `cfg` describes, computed here
    from the data module alone."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("validate")
    losses = []
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            losses.append(F.cross_entropy(net(x)[0].flatten(0, 1), y.flatten(), reduction="none"))
    return torch.cat(losses).mean().item()



@pytest.mark.parametrize("steps", [12, 5])  # validations at step 10 and the end; only the end
def test_best_checkpoint_counts_the_validation_at_the_end(tmp_path, corpus, steps):
    _, out = run(tmp_path, corpus, f"trainer.max_steps={steps}")
    val = column(read_metrics(out), "val/loss")
    assert all(val[-1][1] < v for _, v in val[:-1])  # still learning: the end is the best
    assert json.loads((out / "metrics.json").read_text())["best_val_loss"] == pytest.approx(val[-1][1])
    assert torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)["global_step"] == steps


def test_same_seed_same_loss_curve(tmp_path, corpus):
    curves = [column(read_metrics(run(tmp_path, corpus, "trainer.max_steps=15", name=n)[1]), "train/loss")
              for n in ("a", "b")]
    assert len(curves[0]) == 15 and curves[0] == curves[1]
    other = column(read_metrics(run(tmp_path, corpus, "trainer.max_steps=15", "seed=7", name="c")[1]),
                   "train/loss")
    assert other != curves[0]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, corpus):
    """40 steps in one go, for the resumed runs to match."""
    return run(tmp_path_factory.mktemp("whole"), corpus, "trainer.max_steps=40")[1]


def assert_continues(resumed_run, whole, at: int):
    """The resumed run logs the steps from `at` on, with the losses of the uninterrupted run."""
    expected = column(read_metrics(whole), "train/loss")[at:]
    resumed = column(read_metrics(resumed_run), "train/loss")
    assert [s for s, _ in resumed] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(resumed, expected):
        assert a == pytest.approx(b, abs=1e-6)
    assert column(read_metrics(resumed_run), "val/loss")[-1] == column(read_metrics(whole), "val/loss")[-1]


def test_resume_from_last_checkpoint_matches_uninterrupted_run(tmp_path, corpus, whole_run):
    steps = ["trainer.max_steps=40"]
    _, first = run(tmp_path, corpus, *steps, "+callbacks.stop._target_=helpers.StopAt", "+callbacks.stop.step=20",
                   name="first")
    assert column(read_metrics(first), "train/loss")[-1][0] == 20  # stopped after 20 steps
    _, second = run(tmp_path, corpus, *steps, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", name="second")
    assert_continues(second, whole_run, at=20)


def test_ctrl_c_leaves_a_checkpoint_at_that_step_to_resume_from(tmp_path, corpus, whole_run):
    """Ctrl-C at step 25, between validations (every 10 steps): Lightning shuts down and exits, and
    checkpoints/interrupted.ckpt holds step 25, where last.ckpt holds step 20."""
    steps = ["trainer.max_steps=40"]
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            run(tmp_path, corpus, *steps, "+callbacks.interrupt._target_=helpers.InterruptAt",
                "+callbacks.interrupt.step=25", name="first")
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C while it shuts down
    checkpoints = tmp_path / "first" / "checkpoints"
    assert torch.load(checkpoints / "interrupted.ckpt", weights_only=False)["global_step"] == 25
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 20
    _, second = run(tmp_path, corpus, *steps, f"ckpt_path={checkpoints / 'interrupted.ckpt'}", name="second")
    assert_continues(second, whole_run, at=25)


def test_a_run_in_a_used_folder_starts_fresh(tmp_path, corpus):
    """ckpt_path=null means a fresh start, also where the folder holds checkpoints of an earlier run."""
    runs = [column(read_metrics(run(tmp_path, corpus, "trainer.max_steps=12", name="same")[1]), "train/loss")
            for _ in range(2)]
    assert runs[1][0][0] == 1 and runs[1] == runs[0]


class GradientProbe(L.Callback):
    """The largest |gradient| element and the global norm after clipping, at the first step."""

    seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if not GradientProbe.seen:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            GradientProbe.seen = {"max": max(g.abs().max().item() for g in grads),
                                  "norm": torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()}


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clip_algorithm_is_honoured(tmp_path, corpus, algorithm):
    GradientProbe.seen = {}
    run(tmp_path, corpus, "trainer.max_steps=1", "trainer.gradient_clip_val=1e-3",
        f"trainer.gradient_clip_algorithm={algorithm}", "+callbacks.probe._target_=test_train.GradientProbe")
    if algorithm == "norm":  # the whole vector scaled to norm 1e-3
        assert GradientProbe.seen["norm"] == pytest.approx(1e-3, rel=1e-4)
    else:  # each element cut to [-1e-3, 1e-3]: many saturate, so the norm is far larger
        assert GradientProbe.seen["max"] == pytest.approx(1e-3) and GradientProbe.seen["norm"] > 1e-2


@pytest.mark.parametrize("model", ["bigram", "ngram"])
def test_baselines_train(model, tmp_path, corpus):
    val_loss, out = run(tmp_path, corpus, f"model={model}", tiny=TINY_RUN)
    val = column(read_metrics(out), "val/loss")
    assert val_loss == val[-1][1] < val[0][1]


def test_stan_preset_fits_its_small_validation_split(tmp_path):
    tiny_run = [o for o in TINY_RUN if not o.startswith(("data.", "trainer.max_steps"))]
    cfg = compose_train([*TINY_MODEL, *tiny_run, "data=stan", "trainer.max_steps=10"], tmp_path)
    val_loss = train(cfg)
    assert cfg.data.eval_batches == 8 and column(read_metrics(tmp_path), "val/loss")[-1][1] == val_loss
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 10


class BarProbe(L.Callback):
    """The trainer's progress bar at the start of training."""

    seen: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        BarProbe.seen.append(trainer.progress_bar_callback)


def test_progress_bar_can_be_turned_off(tmp_path, corpus):
    """trainer.enable_progress_bar=false with the callbacks group's bar left in: no bar, and no error."""
    BarProbe.seen = []
    with_bar = [o for o in TINY if not o.startswith("trainer.enable_progress_bar")]
    run(tmp_path, corpus, "trainer.max_steps=2", "+callbacks.probe._target_=test_train.BarProbe", tiny=with_bar)
    run(tmp_path, corpus, "trainer.max_steps=2", "+callbacks.probe._target_=test_train.BarProbe",
        "trainer.enable_progress_bar=false", name="off", tiny=with_bar)
    assert type(BarProbe.seen[0]).__name__ == "StepProgressBar" and BarProbe.seen[1] is None


def test_training_without_validation(tmp_path, corpus):
    """trainer.limit_val_batches=0: no validation, no val metrics, and still a metrics.json, a last.ckpt to
    resume or sample from, and samples at the end."""
    val_loss, out = run(tmp_path, corpus, "trainer.max_steps=12", "trainer.limit_val_batches=0")
    metrics = json.loads((out / "metrics.json").read_text())
    assert val_loss is None and metrics["val_loss"] is None and metrics["best_val_loss"] is None
    assert metrics["steps"] == 12 and not column(read_metrics(out), "val/loss")
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12
    assert not (out / "checkpoints" / "best.ckpt").exists()
    assert [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()] == [12]
