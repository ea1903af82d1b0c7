"""Trainer presets: Lightning DDP in 2 processes on the CPU (trainer=ddp_cpu) inside a Hydra multirun, and
bf16 autocast on the CPU.

Under pytest, `ddp` would relaunch pytest itself for rank 1, so DDP runs go through `python -m lam.train` in a
subprocess, which is also how a user starts them.
"""

import json
import os
import random
import subprocess
import sys
from typing import ClassVar

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, IterableDataset

from helpers import TINY, column, compose_train, read_metrics
from lam.training.datamodule import RandomWindows, TextDataModule
from lam.errors import UserError
from lam.train import train
from precisions import PRECISION, curves_agree

pytestmark = pytest.mark.precision

STEPS, BATCH, BLOCK = 10, 4, 32
RUN = [*TINY, f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}", "data=custom"]
# How close a 2-process run and one process on the same global batches must be. They compute the same sums in
# a different order (each rank's mean gradient, all-reduced and halved, against one backward over both
# batches), so they differ only by float32 rounding: measured <= 5e-7 in every logged loss of 10 steps. The
# limit leaves 20x room for other CPUs' kernels. A real difference in what is trained moves the loss 1000x
# more: other windows by ~3e-2 (checked below), a rank training another config or losing its gradient by more.
TOLERANCE = 1e-5
ONE_STREAM = "lam.training.datamodule.TextDataModule.from_path"  # one process's own windows


class Joined(IterableDataset):
    """Batch i of each stream, concatenated."""

    def __init__(self, streams):
        self.streams = streams

    def __iter__(self):
        for batches in zip(*self.streams):
            yield tuple(torch.cat(parts) for parts in zip(*batches))


class TwoRanksInOne(TextDataModule):
    """One process that trains at step i on the batches that ranks 0 and 1 of a 2-process run draw at step i,
    joined: the same global batch, so the same gradient up to rounding."""

    def train_dataloader(self) -> DataLoader:
        ranks = [RandomWindows(self.splits["train"], self.block_size, self.batch_size, self.seed, rank)
                 for rank in (0, 1)]
        return DataLoader(Joined(ranks), batch_size=None)


def test_ranks_draw_windows_that_never_repeat_across_ranks():
    tokens = np.arange(100_000, dtype=np.uint16)
    starts = {}
    for rank in range(4):
        windows = RandomWindows(tokens, BLOCK, BATCH, seed=1, rank=rank)
        for i in range(50):
            x, y = windows.batch(i)
            assert torch.equal(x[:, 1:], y[:, :-1])
            starts[rank, i] = tuple(x[:, 0].tolist())
    assert len(set(starts.values())) == len(starts)  # no batch is drawn twice, on any rank or step
    again = RandomWindows(tokens, BLOCK, BATCH, seed=1, rank=2)
    assert tuple(again.batch(7)[0][:, 0].tolist()) == starts[2, 7]  # batch i of rank r: from (seed, r, i) only


def first_tokens(windows) -> tuple[int, ...]:
    """The first token of each window of an (x, y) batch: where the windows start, on np.arange tokens."""
    return tuple(windows[0][:, 0].tolist())


def test_windows_depend_on_the_seed_rank_and_batch_index_only(tmp_path, corpus):
    """Batch i of rank r comes from (data seed, r, i) and nothing else: not the global RNGs, where the stream
    started (a resumed run starts at i), the DataLoader's workers, or the run's seed beside data.seed."""
    tokens = np.arange(100_000, dtype=np.uint32)
    keys = [(seed, rank, i) for seed in (1, 2) for rank in (0, 1) for i in range(8)]
    drawn = {key: first_tokens(RandomWindows(tokens, BLOCK, BATCH, key[0], key[1]).batch(key[2])) for key in keys}
    assert len(set(drawn.values())) == len(keys)  # another seed, rank or index: other windows

    torch.manual_seed(5), np.random.seed(5), random.seed(5)  # the global RNGs elsewhere
    assert all(first_tokens(RandomWindows(tokens, BLOCK, BATCH, seed, rank).batch(i)) == drawn[seed, rank, i]
               for seed, rank, i in keys)
    resumed = iter(RandomWindows(tokens, BLOCK, BATCH, seed=2, rank=1, start=3))
    assert [first_tokens(next(resumed)) for _ in range(5)] == [drawn[2, 1, i] for i in range(3, 8)]
    two_workers = DataLoader(RandomWindows(tokens, BLOCK, BATCH, seed=1, rank=0), batch_size=None, num_workers=2)
    assert [first_tokens(b) for b, _ in zip(two_workers, range(8))] == [drawn[1, 0, i] for i in range(8)]

    def data_windows(*overrides):  # the first batches a run's DataModule feeds rank 0
        datamodule = instantiate(compose_train([*RUN, f"data.path={corpus}", *overrides], tmp_path).data)
        datamodule.setup("fit")
        return [batch[0] for batch, _ in zip(datamodule.train_dataloader(), range(3))]

    same = data_windows("seed=1")
    assert all(torch.equal(a, b) for a, b in zip(same, data_windows("seed=2", "data.seed=1")))
    assert not any(torch.equal(a, b) for a, b in zip(same, data_windows("seed=1", "data.seed=2")))


def lam_train(*overrides, cwd):
    """`python -m lam.train ...` in a subprocess; its output is shown if it fails."""
    proc = subprocess.run([sys.executable, "-m", "lam.train", *overrides], cwd=cwd, capture_output=True,
                          check=False, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def one_process(tmp_path, corpus, *overrides, name, datamodule="test_ddp.TwoRanksInOne.from_path"):
    out = tmp_path / name
    train(compose_train([*RUN, f"data.path={corpus}", f"data._target_={datamodule}", *overrides], out))
    return out


@pytest.mark.slow
def test_ddp_multirun_jobs_match_one_process_on_the_same_global_batch(tmp_path, corpus):
    """Two jobs of a multirun, each trained by 2 DDP processes: each job gets one run folder, one set of
    checkpoints and one log, and trains what one process trains on the same global batches."""
    lrs = [0.003, 0.001]
    sweep = tmp_path / "sweep"
    lam_train("-m", *RUN, f"data.path={corpus}", "trainer=ddp_cpu", *PRECISION["32-true"],
              f"optim.lr={','.join(map(str, lrs))}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing written outside the sweep folder
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [job["job"] for job in summary["jobs"]] == ["0", "1"]

    for job, lr in enumerate(lrs):
        run = sweep / str(job)
        # rank 1 ran this job, in this folder: Lightning relaunched the job, not the sweep
        assert (run / "train_ddp_process_1.log").is_file()
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
        rows = read_metrics(run)
        assert [s for s, _ in column(rows, "train/loss")] == list(range(1, STEPS + 1))  # logged once per step
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == STEPS and metrics["tokens_seen"] == STEPS * 2 * BATCH * BLOCK
        assert summary["jobs"][job]["metrics"] == metrics
        assert f"optim.lr={lr}" in summary["jobs"][job]["overrides"]

        reference = one_process(tmp_path, corpus, f"optim.lr={lr}", *PRECISION["32-true"], name=f"one-{job}")
        expected = json.loads((reference / "metrics.json").read_text())
        assert metrics["val_loss"] == pytest.approx(expected["val_loss"], abs=TOLERANCE)
        ddp_curve, one_curve = column(rows, "train/loss"), column(read_metrics(reference), "train/loss")
        assert np.allclose([v for _, v in ddp_curve], [v for _, v in one_curve], rtol=0, atol=TOLERANCE)

    # the comparison can tell: one process on twice the batch, but other windows, ends elsewhere
    other = one_process(tmp_path, corpus, f"optim.lr={lrs[0]}", f"data.batch_size={2 * BATCH}",
                        *PRECISION["32-true"], name="other", datamodule=ONE_STREAM)
    first = json.loads((sweep / "0" / "metrics.json").read_text())["val_loss"]
    assert abs(json.loads((other / "metrics.json").read_text())["val_loss"] - first) > 1000 * TOLERANCE


@pytest.mark.slow
def test_ddp_matches_one_process_in_bf16(tmp_path, corpus):
    """The bf16-mixed twin of the test above, one run: its losses agree with one process's on the same global
    batches within precisions.tolerance (3.5e-4 of each loss; measured: 2e-5 of it), while one process on other
    windows is 6e-3 of it off."""
    bf16 = PRECISION["bf16-mixed"]
    ddp = tmp_path / "ddp"
    lam_train(*RUN, f"data.path={corpus}", "trainer=ddp_cpu", *bf16, f"hydra.run.dir={ddp}", cwd=tmp_path)
    reference = one_process(tmp_path, corpus, *bf16, name="one")
    other = one_process(tmp_path, corpus, f"data.batch_size={2 * BATCH}", *bf16, name="other", datamodule=ONE_STREAM)
    for key in ("train/loss", "val/loss"):
        assert curves_agree(column(read_metrics(ddp), key), column(read_metrics(reference), key), "bf16-mixed")
    assert not curves_agree(column(read_metrics(other), "train/loss"), column(read_metrics(reference), "train/loss"),
                            "bf16-mixed")


def test_spawned_ranks_are_refused(tmp_path, corpus):
    cfg = compose_train([*RUN, f"data.path={corpus}", "trainer=ddp_cpu", "trainer.strategy=ddp_spawn"],
                        tmp_path)
    with pytest.raises(UserError, match="use trainer.strategy=ddp"):
        train(cfg)


class RecordDtype(L.Callback):
    """Records the dtype of the logits of every training forward pass of the net (validation and samples are
    in eval mode)."""
    seen: ClassVar[list] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        RecordDtype.seen = []
        pl_module.net.register_forward_hook(self.record)

    @staticmethod
    def record(module, args, out) -> None:
        if module.training:
            RecordDtype.seen.append(out[0].dtype)


@pytest.mark.slow
def test_a_whole_run_trains_in_float16_with_a_grad_scaler(tmp_path, corpus):
    """16-mixed on the CPU: Lightning's MixedPrecision plugin with torch.amp.GradScaler("cpu") (on the CPU,
    trainer.precision=16-mixed alone becomes bf16-mixed). float16 logits, no step skipped for an overflow, the
    loss falls, samples are drawn, and the checkpoint keeps the scaler's state for a resumed run."""
    cfg = compose_train([*RUN, f"data.path={corpus}", *PRECISION["16-mixed"],
                         "+callbacks.dtype._target_=test_ddp.RecordDtype"], tmp_path)
    assert train(cfg) < 3.5  # from ln(vocab size) = 3.6
    assert set(RecordDtype.seen) == {torch.float16}
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS and checkpoint["MixedPrecision"]["scale"] == 2.0**16  # no inf met
    assert json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[-1])["step"] == STEPS


@pytest.mark.slow
def test_cpu_trainer_trains_with_bf16_autocast(tmp_path, corpus):
    cfg = compose_train([*RUN, f"data.path={corpus}", "trainer.precision=bf16-mixed",
                         "callbacks.samples=null", "+callbacks.dtype._target_=test_ddp.RecordDtype"], tmp_path)
    assert train(cfg) < 3.5  # from ln(vocab size) = 3.6
    assert set(RecordDtype.seen) == {torch.bfloat16}
