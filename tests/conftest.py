import os
from pathlib import Path

import pytest
import torch

from helpers import write_corpus


@pytest.fixture(autouse=True, scope="session")
def isolated_caches(tmp_path_factory):
    """Token caches and wandb files go to a temporary folder; corpora come from LAM_DATA_DIR (CI points it
    at the shared data) or are downloaded."""
    os.environ["LAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("token-cache"))
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_DIR"] = str(tmp_path_factory.mktemp("wandb"))
    os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny tensors or models (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): no op waits on an OpenMP hand-off, which on a busy 2-core machine made such modules many
    times slower; subprocesses get OMP_NUM_THREADS=1 of their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
