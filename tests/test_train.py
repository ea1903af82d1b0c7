"""End to end: train a tiny model for a few steps on the CPU, checkpoint, resume, generate."""

import io
import json
import signal
from pathlib import Path

import lightning as L
import pytest
import safetensors
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from helpers import TINY, TINY_MODEL, TINY_RUN, column, compose_train, read_metrics
from lam.config import quote_overrides
from lam.export import export
from lam.generate import load_checkpoint, sample
from lam.train import train
from precisions import EPS, PRECISION, curves_agree

pytestmark = [pytest.mark.slow, pytest.mark.precision]


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
    text = sample(net, tokenizer, "The king", 25, out=printed, temperature=0.8,
                  generator=torch.Generator().manual_seed(0))
    ids, generator = tokenizer.encode("The king"), torch.Generator().manual_seed(0)
    with torch.no_grad():  # the same draws, each from the whole context recomputed (its last block_size tokens)
        for _ in range(25):
            logits = net(torch.tensor([ids[-cfg.data.block_size:]]))[0][:, -1]
            ids.append(int(torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=generator)))
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
def test_best_and_last_checkpoints_count_the_validation_at_the_end(tmp_path, corpus, steps):
    _, out = run(tmp_path, corpus, f"trainer.max_steps={steps}")
    val = column(read_metrics(out), "val/loss")
    assert all(val[-1][1] < v for _, v in val[:-1])  # still learning: the end is the best
    assert json.loads((out / "metrics.json").read_text())["best_val_loss"] == pytest.approx(val[-1][1])
    for name in ("best", "last"):  # last.ckpt too holds the end, not the latest validation inside fit
        assert torch.load(out / "checkpoints" / f"{name}.ckpt", weights_only=True)["global_step"] == steps


# The exact comparisons run in 32-true, and their twins in bf16-mixed within precisions.tolerance
EXACT = ["32-true", "bf16-mixed"]


@pytest.mark.parametrize("precision", EXACT)
def test_same_seed_same_loss_curve(tmp_path, corpus, precision):
    def curve(name, *overrides):
        _, out = run(tmp_path, corpus, "trainer.max_steps=15", *PRECISION[precision], *overrides, name=name)
        return column(read_metrics(out), "train/loss")

    first = curve("a")
    assert len(first) == 15 and curves_agree(curve("b"), first, precision)
    assert not curves_agree(curve("c", "seed=7"), first, precision)  # another init and windows: up to 1% apart


@pytest.fixture(scope="module", params=EXACT)
def resume_precision(request) -> str:
    """The precision of the resume tests: a module-wide parameter, so each precision's whole run is one run."""
    return request.param


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, corpus, resume_precision):
    """40 steps in one go, for the resumed runs to match."""
    return run(tmp_path_factory.mktemp("whole"), corpus, "trainer.max_steps=40", *PRECISION[resume_precision])[1]


def assert_continues(resumed_run, whole, at: int, precision: str):
    """The resumed run logs the steps from `at` on, with the losses of the uninterrupted run: equal to 1e-6 in
    float32, within precisions.tolerance in bf16-mixed (measured: equal in both; a resumed run that trains on
    other windows is 1% off)."""
    expected = column(read_metrics(whole), "train/loss")[at:]
    resumed = column(read_metrics(resumed_run), "train/loss")
    assert curves_agree(resumed, expected, precision, fp32=1e-6), (resumed, expected)
    assert curves_agree(column(read_metrics(resumed_run), "val/loss")[-1:],
                        column(read_metrics(whole), "val/loss")[-1:], precision)


def test_resume_from_last_checkpoint_matches_uninterrupted_run(tmp_path, corpus, whole_run, resume_precision):
    steps = ["trainer.max_steps=40", *PRECISION[resume_precision]]
    _, first = run(tmp_path, corpus, *steps, "+callbacks.stop._target_=helpers.StopAt", "+callbacks.stop.step=20",
                   name="first")
    assert column(read_metrics(first), "train/loss")[-1][0] == 20  # stopped after 20 steps
    _, second = run(tmp_path, corpus, *steps, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", name="second")
    assert_continues(second, whole_run, at=20, precision=resume_precision)


@pytest.mark.parametrize("precision", EXACT)
def test_resume_with_accumulated_gradients_matches_uninterrupted_run(tmp_path, corpus, precision):
    """trainer.accumulate_grad_batches=2: the run resumed after step 10 goes on with batch 20 (10 steps of 2
    batches), as the uninterrupted run does."""
    steps = ["trainer.max_steps=16", "trainer.accumulate_grad_batches=2", *PRECISION[precision]]
    _, whole = run(tmp_path, corpus, *steps, name="whole")
    _, first = run(tmp_path, corpus, *steps, "+callbacks.stop._target_=helpers.StopAt", "+callbacks.stop.step=10",
                   name="first")
    assert torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    _, second = run(tmp_path, corpus, *steps, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", name="second")
    assert_continues(second, whole, at=10, precision=precision)


def interrupted(tmp_path, corpus, interrupter: str, *overrides: str) -> Path:
    """Run "first" until `interrupter` (a callback in helpers) stops it with Ctrl-C; its checkpoints folder."""
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            run(tmp_path, corpus, *overrides, f"+callbacks.interrupt._target_=helpers.{interrupter}",
                name="first")
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C while it shuts down
    return tmp_path / "first" / "checkpoints"


def test_ctrl_c_leaves_a_checkpoint_at_that_step_to_resume_from(tmp_path, corpus, whole_run, resume_precision,
                                                               caplog):
    """Ctrl-C at step 25, between validations (every 10 steps): Lightning shuts down and exits, and
    checkpoints/interrupted.ckpt holds step 25, where last.ckpt holds step 20."""
    steps = ["trainer.max_steps=40", *PRECISION[resume_precision]]
    checkpoints = interrupted(tmp_path, corpus, "InterruptAt", *steps, "+callbacks.interrupt.step=25")
    assert torch.load(checkpoints / "interrupted.ckpt", weights_only=True)["global_step"] == 25
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 20
    assert f"stopped at step 25: its state is in {checkpoints / 'interrupted.ckpt'}; the same command with " \
           f"ckpt_path={checkpoints / 'interrupted.ckpt'} resumes it" in caplog.text
    _, second = run(tmp_path, corpus, *steps, f"ckpt_path={checkpoints / 'interrupted.ckpt'}", name="second")
    assert_continues(second, whole_run, at=25, precision=resume_precision)


def test_ctrl_c_inside_a_step_stops_after_that_step(tmp_path, corpus, whole_run, resume_precision, caplog):
    """A real SIGINT that lands inside optimizer step 25, after the weights took it: the run stops at the end
    of that step, so interrupted.ckpt holds step 25 with its weights, and the resumed run trains no batch
    twice."""
    steps = ["trainer.max_steps=40", *PRECISION[resume_precision]]
    checkpoint = interrupted(tmp_path, corpus, "CtrlCInsideStep", *steps, "+callbacks.interrupt.step=25") \
        / "interrupted.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 25
    assert state["optimizer_states"][0]["state"][0]["step"] == 25  # the optimizer took as many steps
    assert f"stopped at step 25: its state is in {checkpoint}" in caplog.text
    _, second = run(tmp_path, corpus, *steps, f"ckpt_path={checkpoint}", name="second")
    assert_continues(second, whole_run, at=25, precision=resume_precision)


def test_a_second_ctrl_c_stops_at_once_and_saves_no_half_step(tmp_path, corpus, caplog):
    checkpoints = interrupted(tmp_path, corpus, "CtrlCInsideStep", "trainer.max_steps=40", *PRECISION["32-true"],
                              "+callbacks.interrupt.step=25", "+callbacks.interrupt.presses=2")
    assert not (checkpoints / "interrupted.ckpt").exists()
    assert f"stopped inside step 25, so that state was not saved; the same command with " \
           f"ckpt_path={checkpoints / 'last.ckpt'} resumes from the last checkpoint" in caplog.text


def test_an_exported_checkpoint_records_the_loss_it_was_saved_with(tmp_path, corpus):
    """25 steps, validated every 10 and at the end: last.ckpt's model file records the end's val loss (the one
    metrics.json holds), best.ckpt's the best one."""
    _, out = run(tmp_path, corpus, "trainer.max_steps=25", *PRECISION["32-true"])
    metrics = json.loads((out / "metrics.json").read_text())
    for name, key in ("last", "val_loss"), ("best", "best_val_loss"):
        export(out / "checkpoints" / f"{name}.ckpt", tmp_path / f"{name}.lam")
        with safetensors.safe_open(tmp_path / f"{name}.lam", "pt") as f:
            assert json.loads(f.metadata()["record"])["val_loss"] == pytest.approx(metrics[key], rel=1e-6), name


def test_a_run_in_a_used_folder_starts_fresh(tmp_path, corpus):
    """ckpt_path=null means a fresh start, also where the folder holds checkpoints of an earlier run; its
    best.ckpt and last.ckpt replace the earlier run's (no best-v1.ckpt beside them)."""
    runs = [column(read_metrics(run(tmp_path, corpus, f"trainer.max_steps={steps}", *PRECISION["32-true"],
                                    name="same")[1]), "train/loss") for steps in (12, 10)]
    assert runs[1][0][0] == 1 and runs[1][:5] == runs[0][:5]  # the same warmup, whatever max_steps
    checkpoints = tmp_path / "same" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "best.ckpt", weights_only=True)["global_step"] == 10


class GradientProbe(L.Callback):
    """The largest |gradient| element and the global norm after clipping, at the first step."""

    seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if not GradientProbe.seen:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            GradientProbe.seen = {"max": max(g.abs().max().item() for g in grads),
                                  "norm": torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()}


@pytest.fixture(scope="module")
def fp32_grad_norm(tmp_path_factory, corpus) -> float:
    """The global gradient norm of the first step in float32, as logged."""
    _, out = run(tmp_path_factory.mktemp("fp32"), corpus, "trainer.max_steps=1", *PRECISION["32-true"])
    return column(read_metrics(out), "grad_norm")[0][1]


# How far the first step's gradient norm under a mixed precision may be from float32's. Autocast rounds the
# inputs of each matmul to the half format (relative error <= eps) and the backward rounds the gradients flowing
# back through each of the model's ~10 matmuls and products again (layer: q, k, v, scores, values, out, MLP up
# and down; head), so each gradient element is off by at most ~10 eps, relative, if every error went one way.
# The norm, a root of a sum of squares, is off by no more than its elements: rel <= 10 eps (bf16 3.9%, float16
# 0.5%). Measured: bf16 0.006%, float16 0.001%. A norm of scaled gradients is off by the scale, 2**16.
GRAD_NORM_REL = {precision: 10 * EPS[precision] for precision in ("bf16-mixed", "16-mixed")}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_is_honoured_under_every_precision(tmp_path, corpus, fp32_grad_norm, algorithm,
                                                              precision):
    """trainer.gradient_clip_algorithm clips the true (unscaled) gradients, with a fused AdamW too, and
    grad_norm logs their norm before clipping: float32's, up to the precision's rounding."""
    GradientProbe.seen = {}
    _, out = run(tmp_path, corpus, "trainer.max_steps=1", "trainer.gradient_clip_val=1e-3",
                 f"trainer.gradient_clip_algorithm={algorithm}", "+callbacks.probe._target_=test_train.GradientProbe",
                 *PRECISION[precision])
    if algorithm == "norm":  # the whole vector scaled to norm 1e-3
        assert GradientProbe.seen["norm"] == pytest.approx(1e-3, rel=1e-4)
    else:  # each element cut to [-1e-3, 1e-3]: many saturate, so the norm is far larger
        assert GradientProbe.seen["max"] == pytest.approx(1e-3) and GradientProbe.seen["norm"] > 1e-2
    logged = column(read_metrics(out), "grad_norm")[0][1]
    assert logged == pytest.approx(fp32_grad_norm, rel=GRAD_NORM_REL.get(precision, 0))


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
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert not (out / "checkpoints" / "best.ckpt").exists()
    assert [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()] == [12]


def test_ckpt_path_with_a_tilde_resumes_from_the_home_folder(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    run(tmp_path, corpus, "trainer.max_steps=2", *PRECISION["32-true"], name="first")
    # quoted for Hydra's grammar, as the command line's `ckpt_path=~/...` is (lam.config.command_line)
    _, out = run(tmp_path, corpus, "trainer.max_steps=3", *PRECISION["32-true"],
                 *quote_overrides(["ckpt_path=~/first/checkpoints/last.ckpt"]), name="second")
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert [step for step, _ in column(read_metrics(out), "train/loss")] == [3]
