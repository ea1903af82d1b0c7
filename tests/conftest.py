import os
from pathlib import Path

import pytest

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
