"""Building a network from its stored config without Hydra, from LAM's own classes only.

A stored model config is a tree of dicts in Hydra's form: a node with `_target_` names a class, `_partial_: true`
makes it a `functools.partial` (the attention factory). A `_target_` is accepted only if it names a model class
of `lam.models` or an attention class of `lam.models.attention`; nothing is ever imported by a stored name.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

import lam.models
import lam.models.attention
from lam.errors import UserError

KEYS = {"_target_", "_partial_"}  # the only Hydra keys a stored config may use


def lam_classes(*modules) -> dict[str, type[nn.Module]]:
    """The nn.Module classes each module exports, by the names a config may give them: the package's
    (lam.models.LAM) and the defining module's (lam.models.decoder.LAM)."""
    found = {}
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) and issubclass(obj, nn.Module) and not inspect.isabstract(obj):
                found[f"{module.__name__}.{name}"] = found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


ALLOWED = lam_classes(lam.models, lam.models.attention)


def check_targets(config, where: str, key: str = "model") -> None:
    """A UserError naming the first node of `config` whose `_target_` is not one of LAM's classes, or that
    uses a Hydra key other than `_target_` and `_partial_`."""
    if isinstance(config, dict):
        target = config.get("_target_")
        if "_target_" in config and target not in ALLOWED:
            raise UserError(f"{where}: {key}._target_ is {target!r}, not one of LAM's model or attention "
                            f"classes; refusing to build it")
        for name, value in config.items():
            if name.startswith("_") and name.endswith("_") and name not in KEYS:
                raise UserError(f"{where}: {key}.{name} is not a key LAM writes; refusing to build it")
            check_targets(value, where, f"{key}.{name}")
    elif isinstance(config, list):
        for i, value in enumerate(config):
            check_targets(value, where, f"{key}[{i}]")


def build(config: dict, where: str, **kwargs):
    """The network `config` describes, with `kwargs` added to its top node's arguments, after `check_targets`."""
    if not isinstance(config, dict) or config.get("_target_") not in ALLOWED or config.get("_partial_"):
        raise UserError(f"{where}: the model config does not name a network class of LAM's")
    check_targets(config, where)
    try:
        return instantiate(config, **kwargs)
    except (TypeError, ValueError) as e:  # arguments the classes do not take, or values they refuse
        raise UserError(f"{where}: the model config does not build ({type(e).__name__}: {e})") from None


def instantiate(node, **kwargs):
    if isinstance(node, list):
        return [instantiate(value) for value in node]
    if not isinstance(node, dict):
        return node
    args = {name: instantiate(value) for name, value in node.items() if name not in KEYS}
    if "_target_" not in node:
        return args
    cls = ALLOWED[node["_target_"]]
    if node.get("_partial_", False):
        return functools.partial(cls, **args, **kwargs)
    return cls(**args, **kwargs)
