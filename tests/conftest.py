import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SHORT_RUN, write_corpus
from lam.training.precision import cpu_precision


@pytest.fixture(autouse=True, scope="session")
def isolated_caches(tmp_path_factory):
    """Token caches and wandb files go to a temporary folder; corpora come from LAM_DATA_DIR (CI points it
    at the shared data) or are downloaded."""
    os.environ["LAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("token-cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_DIR"] = str(tmp_path_factory.mktemp("wandb"))
    os.environ.setdefault("WANDB_SILENT", "true")
    # trainer.precision=auto would measure each tiny model's speed: the tests train at this CPU kind's precision
    # instead, or at the other kind's where .ci/run sets LAM_CPU_PRECISION (tests/precisions.py)
    os.environ.setdefault("LAM_CPU_PRECISION", cpu_precision())


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def grid_sweep(tmp_path_factory, corpus) -> Path:
    """The folder of a real grid multirun, `python -m lam.train -m attention=linear,softmax seed=1,2` on the tiny
    model for 5 steps (4 jobs, one validation each), which the tests of sweeps and of lam.compare read."""
    tmp = tmp_path_factory.mktemp("grid")
    sweep = tmp / "sweep"
    proc = subprocess.run([sys.executable, "-m", "lam.train", "-m", *SHORT_RUN, "attention=linear,softmax", "seed=1,2",
                           "data=custom", f"data.path={corpus}", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return sweep


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny tensors or models (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): no op waits on an OpenMP hand-off, which on a busy 2-core machine made such modules many
    times slower; subprocesses get OMP_NUM_THREADS=1 of their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
