"""Where LAM keeps corpora, token caches and precision measurements when no folder is given: the one place
these defaults live (conf/paths/default.yaml reads the first two through the ${lam.data_dir:} and
${lam.cache_dir:} resolvers)."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """$LAM_DATA_DIR, else ~/.cache/lam/data."""
    return Path(os.environ.get("LAM_DATA_DIR") or Path.home() / ".cache" / "lam" / "data").expanduser()


def default_cache_dir() -> Path:
    """$LAM_CACHE_DIR, else ~/.cache/lam/tokens."""
    return Path(os.environ.get("LAM_CACHE_DIR") or Path.home() / ".cache" / "lam" / "tokens").expanduser()


def measurements_dir() -> Path:
    """Where trainer.precision=auto keeps precision.json: $LAM_CACHE_DIR, else ~/.cache/lam (beside the token
    caches' folder rather than inside it)."""
    return Path(os.environ.get("LAM_CACHE_DIR") or Path.home() / ".cache" / "lam").expanduser()
