"""Where the configs live, the resolvers they use, and how the entry points report a user's mistake."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path

from omegaconf import OmegaConf

from lam.errors import UserError
from lam.hardware import cpu_precision

# ${lam.cpu_precision:} in conf/trainer/cpu.yaml
if not OmegaConf.has_resolver("lam.cpu_precision"):
    OmegaConf.register_new_resolver("lam.cpu_precision", cpu_precision)


def config_dir() -> Path:
    """`conf/` of the repository, or its copy inside an installed wheel."""
    installed = Path(__file__).parent / "conf"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, also when Hydra's instantiate wrapped it."""
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def report_user_errors(fn: Callable) -> Callable:
    """Print a UserError as one line on stderr and exit with status 1; let every other error through."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if (err := user_error(e)) is None:
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper
