"""Experiment tracking: what the loggers wrote, read back from their own files (the offline wandb run through
wandb's reader, TensorBoard's event file, the CSV), rank-zero logging under DDP, and FLOPs per token."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import rich
import torch
import wandb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import TINY, column, compose_train, read_metrics
from lam.models.flops import flops_per_token, forward_flops_per_token
from lam.models import LAM
from lam.models.attention import Attention, LinearAttention, SoftmaxAttention
from lam.train import train
from lam.training.precision import cpu_precision

REPO = Path(__file__).resolve().parents[1]
CSV_COLUMNS = {"step", "epoch", "train/loss", "lr", "grad_norm", "tokens_per_sec", "flops_per_sec", "elapsed_s",
               "val/loss",
               "val/ppl"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models train fastest on one thread


def wandb_env(tmp: Path) -> dict:
    """Offline wandb whose files, caches and artifact staging all stay under `tmp`."""
    return {"WANDB_MODE": "offline", "WANDB_CONSOLE": "off", "WANDB_SILENT": "true",
            **{var: str(tmp / "wandb-home") for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR",
                                                        "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR")}}


def run_train(out: Path, corpus: Path, *overrides: str) -> Path:
    train(compose_train([*TINY, "data=custom", f"data.path={corpus}", *overrides], out))
    return out


def wandb_run_dir(out: Path) -> Path:
    (run_dir,) = (out / "wandb").glob("offline-run-*")  # exactly one run
    return run_dir


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of the run's .wandb log, decoded by wandb's own reader (`wandb leet inspect --json`)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def history(records: list[dict], key: str) -> list[tuple[int, object]]:
    """(trainer/global_step, value) of every history row that logged `key`."""
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    return [(row["trainer/global_step"], row[key]) for row in rows if key in row]


def table_rows(run_dir: Path, records: list[dict], key: str) -> list[list]:
    """All rows of an incrementally logged wandb table, from the files its increments were written to."""
    paths = [path for _, path in history(records, f"{key}.path")]
    return [row for path in paths for row in json.loads((run_dir / "files" / path).read_text())["data"]]


@pytest.fixture(scope="module")
def many_run(tmp_path_factory, corpus) -> Path:
    """One tiny run with logger=many: CSV, TensorBoard and wandb side by side."""
    tmp = tmp_path_factory.mktemp("many")
    with pytest.MonkeyPatch.context() as mp:
        for var, value in wandb_env(tmp).items():
            mp.setenv(var, value)
        return run_train(tmp / "run", corpus, "logger=many", "seed=7")


@pytest.mark.slow
def test_step_metrics_are_logged_at_the_steps_lightning_writes(tmp_path, corpus):
    """The module calls self.log only at every log_every_n_steps-th step: the values written there are the
    ones a run that logs every step writes."""
    short = ["trainer.max_steps=10", "trainer.val_check_interval=10"]
    dense = read_metrics(run_train(tmp_path / "dense", corpus, *short))
    sparse = read_metrics(run_train(tmp_path / "sparse", corpus, *short, "trainer.log_every_n_steps=4"))
    for key in ("train/loss", "lr", "grad_norm"):
        every_step = dict(column(dense, key))
        assert sorted(every_step) == list(range(1, 11))
        assert column(sparse, key) == [(step, every_step[step]) for step in (4, 8)]


def test_wandb_run_holds_curves_samples_config_and_run_facts(many_run):
    run_dir = wandb_run_dir(many_run)
    records = wandb_records(run_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == "lam-linear-custom-s7" and run["run_group"] == "train"
    assert run["tags"] == ["lam", "linear", "custom"]

    csv = read_metrics(many_run)
    assert history(records, "train/loss") == column(csv, "train/loss")
    assert len(column(csv, "train/loss")) == 30
    assert history(records, "val/loss") == column(csv, "val/loss")
    assert [s for s, _ in column(csv, "val/loss")] == [10, 20, 30]
    for key in ("lr", "grad_norm", "tokens_per_sec", "val/ppl"):
        assert [s for s, _ in history(records, key)] == [s for s, _ in column(csv, key)]
    # the samples table grows at every validation (global steps 10, 20, 30), as samples.jsonl does
    rows = table_rows(run_dir, records, "samples")
    samples = [json.loads(line) for line in (many_run / "samples.jsonl").read_text().splitlines()]
    assert rows == [[s["step"], s["prompt"], s["sample"]] for s in samples]
    assert [row[0] for row in rows] == [10, 20, 30]

    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    assert config["seed"] == 7 and config["model"]["n_embd"] == 32 and config["data"]["path"].endswith(".txt")
    metrics = json.loads((many_run / "metrics.json").read_text())
    assert config["params"] == metrics["params"] and config["flops_per_token"] == metrics["flops_per_token"]
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    assert {k: summary[k] for k in ("params", "flops_per_token", "tokens_seen", "best_val_loss")} == \
        {k: metrics[k] for k in ("params", "flops_per_token", "tokens_seen", "best_val_loss")}
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]
    assert wandb.run is None


@pytest.mark.slow
def test_csv_and_tensorboard_log_the_same_metrics(many_run):
    csv = read_metrics(many_run)
    assert set(csv[0]) == CSV_COLUMNS
    (events,) = (many_run / "tensorboard").glob("events.out.tfevents.*")
    tb = EventAccumulator(str(events)).Reload()
    assert set(tb.Tags()["scalars"]) == CSV_COLUMNS - {"step"}
    for key in CSV_COLUMNS - {"step"}:
        assert [(e.step, pytest.approx(e.value)) for e in tb.Scalars(key)] == column(csv, key)


class Boom(L.Callback):
    """Raises `error` once training reaches global step 3."""

    def __init__(self, error: str):
        self.error = error

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 3:
            raise {"error": RuntimeError("boom"), "ctrl-c": KeyboardInterrupt()}[self.error]


@pytest.mark.slow
@pytest.mark.parametrize("error, raised", [("error", RuntimeError), ("ctrl-c", SystemExit)])
def test_an_error_or_ctrl_c_in_training_still_finishes_the_wandb_run(error, raised, tmp_path, corpus,
                                                                      monkeypatch):
    for var, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C while it shuts down
    try:
        with pytest.raises(raised):  # Lightning turns Ctrl-C into sys.exit(1)
            run_train(tmp_path / "run", corpus, "logger=wandb", f"+callbacks.boom._target_={__name__}.Boom",
                      f"+callbacks.boom.error={error}")
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert wandb.run is None
    records = wandb_records(wandb_run_dir(tmp_path / "run"))
    assert [s for s, _ in history(records, "train/loss")] == [1, 2]  # the third batch raised before logging
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [1]


@pytest.mark.slow
def test_under_ddp_only_rank_zero_logs(tmp_path, corpus):
    """Two CPU processes (Lightning relaunches `python -m lam.train` for rank 1): one wandb run, each step
    logged once."""
    out = tmp_path / "run"
    env = {**os.environ, **wandb_env(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")]
    done = subprocess.run([sys.executable, "-m", "lam.train", *overrides, "data=custom",
                           f"data.path={corpus}", "trainer.max_steps=10", "logger=wandb", "trainer=ddp_cpu",
                           f"hydra.run.dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    records = wandb_records(wandb_run_dir(out))
    assert [s for s, _ in history(records, "train/loss")] == list(range(1, 11))
    assert [s for s, _ in history(records, "val/loss")] == [10]
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]
    assert json.loads((out / "metrics.json").read_text())["tokens_seen"] == 10 * 2 * 4 * 32  # both ranks


def tiny_lam(attention, n_layer=2) -> LAM:
    return LAM(vocab_size=10, attention=attention, n_layer=n_layer, n_head=2, n_embd=8, block_size=64)


def test_flops_count_linear_layers_once_and_causal_softmax_pairs():
    # per layer: qkv 8x24, proj 8x8, mlp 8x32 and 32x8 = 768 weights; the head, tied to the embedding, 10x8
    # softmax at T=4: the 4 queries see 1, 2, 3, 4 keys, 2.5 on average, at 4 x 8 FLOPs each
    assert forward_flops_per_token(tiny_lam(SoftmaxAttention), 4) == 2 * (2 * 768 + 80) + 2 * 4 * 8 * 2.5
    net = tiny_lam(SoftmaxAttention)
    assert flops_per_token(net, 4) == 3 * forward_flops_per_token(net, 4)  # backward: twice the forward


def test_flops_linear_attention_counts_chunk_pairs_and_state():
    # chunks of 2: queries see 1, 2, 1, 2 keys (1.5), per key 2 heads x 2(F + D) = 32 FLOPs; the state 4·H·F·D
    attn = LinearAttention(d_model=8, n_head=2, chunk_size=2)
    assert attn.mixing_flops(4) == 32 * 1.5 + 4 * 2 * 4 * 4
    taylor = LinearAttention(d_model=8, n_head=2, chunk_size=2, feature_map="taylor")  # F = 1 + 4 + 10
    assert taylor.mixing_flops(4) == 2 * 2 * (15 + 4) * 1.5 + 4 * 2 * 15 * 4


def test_attention_cost_per_token_grows_with_context_for_softmax_only():
    softmax, linear = tiny_lam(SoftmaxAttention), tiny_lam(functools.partial(LinearAttention, chunk_size=16))
    per_token = {T: (flops_per_token(softmax, T), flops_per_token(linear, T)) for T in (16, 32, 48)}
    # softmax: 16 more tokens, 8 more keys per query on average, 4·d FLOPs each, in 2 layers, x3 for training
    assert per_token[32][0] - per_token[16][0] == per_token[48][0] - per_token[32][0] == 3 * 2 * 4 * 8 * 8
    assert per_token[16][1] == per_token[32][1] == per_token[48][1]  # linear: the same per token


def test_a_mechanism_without_its_flops_is_refused_by_name():
    class Mystery(Attention):
        def mix(self, q, k, v, state, gates=None):
            return v, state

    with pytest.raises(NotImplementedError, match="Mystery must implement mixing_flops"):
        forward_flops_per_token(tiny_lam(Mystery, n_layer=1), 8)


def wandb_run_dirs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_a_resumed_wandb_run_continues_the_same_wandb_run(tmp_path, corpus, monkeypatch):
    """Stopped after 20 of 40 steps, resumed in another run folder from last.ckpt: the second part logs into the
    wandb run of the first (same id), from step 21 on, so the dashboard shows one curve."""
    for var, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    steps = ["trainer.max_steps=40", "logger=wandb"]
    first = run_train(tmp_path / "first", corpus, *steps, "+callbacks.stop._target_=helpers.StopAt",
                      "+callbacks.stop.step=20")
    second = run_train(tmp_path / "second", corpus, *steps, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    other = run_train(tmp_path / "other", corpus, *steps, "trainer.max_steps=2")  # a fresh run: a new id
    (run_a,), (run_b,), (run_c,) = wandb_run_dirs(first), wandb_run_dirs(second), wandb_run_dirs(other)
    records_a, records_b = wandb_records(run_a), wandb_records(run_b)
    ids = [[r["run"]["run_id"] for r in records if r["type"] == "run"]
           for records in (records_a, records_b, wandb_records(run_c))]
    assert ids[0] == ids[1] and len(ids[0]) == 1 and ids[2] != ids[0]
    assert [s for s, _ in history(records_a, "train/loss")] == list(range(1, 21))
    assert [s for s, _ in history(records_b, "train/loss")] == list(range(21, 41))
    assert [s for s, _ in history(records_b, "val/loss")] == [30, 40]


class SlowValidation(L.Callback):
    """Each validation takes `seconds` longer, half inside it and half after it (where samples are drawn)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_validation_batch_end(self, trainer, *args) -> None:
        if args[-1] == 0:  # batch_idx
            time.sleep(self.seconds / 2)

    def on_validation_end(self, trainer, pl_module) -> None:
        time.sleep(self.seconds / 2)


@pytest.mark.slow
def test_throughput_measures_training_time_only(tmp_path, corpus):
    """Validations every 10 steps, each 2 s slower than it is: neither elapsed_s nor tokens_per_sec counts
    that time, while the run's wall time does."""
    out = run_train(tmp_path / "run", corpus, f"+callbacks.slow._target_={__name__}.SlowValidation",
                    "+callbacks.slow.seconds=2")
    rows = read_metrics(out)
    elapsed = dict(column(rows, "elapsed_s"))  # logged once the first window of 10 batches is full
    assert sorted(elapsed) == list(range(10, 31))
    assert elapsed[21] - elapsed[20] < 0.5 and elapsed[30] < 2  # 10 tiny steps take well under a second
    tokens_per_window = 10 * 4 * 32  # the window of step 30 spans the validation at step 20
    assert dict(column(rows, "tokens_per_sec"))[30] > tokens_per_window / 1
    assert json.loads((out / "metrics.json").read_text())["wall_s"] > 3 * 2


@pytest.mark.slow
def test_samples_print_through_the_progress_bars_console(tmp_path, corpus):
    """With the bar on, the sample panels go through its console (rich's global one, recording here), which
    prints them above the bar instead of into its line."""
    with_bar = [o for o in TINY if not o.startswith("trainer.enable_progress_bar")]
    try:
        train(compose_train([*with_bar, "data=custom", f"data.path={corpus}", "trainer.max_steps=10",
                             "+callbacks.progress_bar.console_kwargs.record=true"], tmp_path / "run"))
        printed = rich.get_console().export_text()
    finally:
        rich.reconfigure()  # a fresh global console for the tests after this one
    assert "sample at step 10" in printed


def cli_train(out: Path, corpus: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lam.train", *TINY, "data=custom", f"data.path={corpus}",
                           f"hydra.run.dir={out}", *overrides], cwd=out.parent, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_train_log_holds_the_runs_log_and_the_terminal_only_what_informs(tmp_path, corpus):
    """train.log: Lightning's messages, the summary; a failed run's error line or traceback. The terminal:
    the summary, without Lightning's device lines, tips and warnings that say nothing about the run."""
    # 12 steps: validations at 10 and at the end, whose best.ckpt and last.ckpt lam.train saves itself
    done = cli_train(tmp_path / "run", corpus, "trainer.max_steps=12")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    for line in ("Seed set to 1337", "GPU available: False", f"run folder: {tmp_path / 'run'}",
                 f"best checkpoint: {best}", f"sample from it: python -m lam.generate ckpt={best}", "val loss: ",
                 f"precision: {cpu_precision()}"):
        assert line in log
    terminal = done.stdout + done.stderr
    assert f"sample from it: python -m lam.generate ckpt={best}" in terminal and "tokens/s: " in terminal
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec", "not supported by the model summary",
                  "weights_only", "Trainer already configured"):
        assert noise not in terminal

    # a user's error's line: tests/test_errors.py (test_cli_prints_one_line_and_exits_1)
    crashed = cli_train(tmp_path / "crash", corpus, f"+callbacks.boom._target_={__name__}.Boom",
                        "+callbacks.boom.error=error")
    assert crashed.returncode == 1
    log = (tmp_path / "crash" / "train.log").read_text()
    assert "run failed" in log and "Traceback" in log and "RuntimeError: boom" in log


@pytest.mark.slow
@pytest.mark.parametrize("interval, drawn_after", [(0, list(range(1, 11))), (3600, [1, 10])])
def test_the_progress_bar_redraws_at_most_every_refresh_interval_and_at_the_last(tmp_path, corpus, monkeypatch,
                                                                                 interval, drawn_after):
    """callbacks.progress_bar.refresh_interval_s over 10 steps: 0 redraws after every batch, as Lightning's
    bar does (2.4 ms a step on a CPU); an hour redraws after the first batch and the last, so the bar still
    ends at 10/10."""
    from lightning.pytorch.callbacks import RichProgressBar

    drawn = []
    original = RichProgressBar.on_train_batch_end

    def record(self, trainer, *args):
        drawn.append(trainer.global_step)
        original(self, trainer, *args)

    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", record)
    with_bar = [o for o in TINY if not o.startswith("trainer.enable_progress_bar")]
    train(compose_train([*with_bar, "data=custom", f"data.path={corpus}", "trainer.max_steps=10",
                         f"callbacks.progress_bar.refresh_interval_s={interval}"], tmp_path / "run"))
    assert drawn == drawn_after


def test_the_progress_bar_shows_this_steps_metrics_else_the_last_written():
    from types import SimpleNamespace

    from lam.training.callbacks import StepProgressBar

    bar = StepProgressBar()
    trainer = SimpleNamespace(progress_bar_metrics={"val/loss": 2.5}, loggers=[])
    module = SimpleNamespace(logged_step_metrics={"train/loss": 3.0, "tokens_per_sec": 12051.4, "lr": 0.1},
                             step_metrics={})
    assert bar.get_metrics(trainer, module) == {"val/loss": 2.5, "train/loss": 3.0, "tokens_per_sec": "12051"}
    module.step_metrics = {"train/loss": torch.tensor(2.0)}  # this step's, not yet written
    assert bar.get_metrics(trainer, module)["train/loss"] == 2.0
