"""Where the configs live, the resolvers they use, and how the entry points report a user's mistake."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from lam.data.paths import default_cache_dir, default_data_dir
from lam.errors import UserError
from lam.training.precision import cpu_precision
from lam.training.runs import flatten, model_groups


def option_of(group: str, target: str) -> str:
    """The conf/<group> option whose `_target_` is `target` ("softmax" for ...SoftmaxAttention); the class's
    name where no option builds it."""
    for path in sorted((config_dir() / group).glob("*.yaml")):
        if OmegaConf.load(path).get("_target_") == target:
            return path.stem
    return target.rpartition(".")[2]


def trained_choices(root: DictConfig) -> dict[str, str]:
    """The choices that say what a run trained: the model's and those of the groups its config takes (a bigram
    takes no attention), e.g. {"model": "lam", "attention": "linear"}. With init_from= the file's model replaced
    the composed one, so each is the option of the class that was built, not the one composed."""
    choices = HydraConfig.get().runtime.choices
    model = flatten(OmegaConf.to_container(root.model, resolve=False)).values()
    groups = model_groups(model, choices)
    if not root.get("init_from"):
        return {group: choices[group] for group in groups}
    return {group: option_of(group, root[group]._target_) for group in groups}


def run_labels(root: DictConfig) -> list[str]:
    """The choices that say what a run trained on what: the trained model's, then the data's; e.g. ["lam",
    "linear", "shakespeare"]."""
    return [*trained_choices(root).values(), HydraConfig.get().runtime.choices["data"]]


def train_groups() -> str:
    """conf/train.yaml's groups and their choices, a line each, for --help: conf/hydra (Hydra's own) and
    conf/apps (the root of the other entry points' configs) are not among them."""
    groups = sorted(p for p in config_dir().iterdir() if p.is_dir() and p.name not in ("hydra", "apps"))
    return "\n".join(f"{g.name}: {', '.join(sorted(f.stem for f in g.glob('*.yaml')))}" for g in groups)


RESOLVERS = {
    "lam.cpu_precision": cpu_precision,  # conf/trainer/cpu.yaml
    "lam.train_groups": train_groups,  # conf/hydra/help/{train,prepare}.yaml
    "lam.data_dir": lambda: str(default_data_dir()),  # conf/paths/default.yaml
    "lam.cache_dir": lambda: str(default_cache_dir()),
    # conf/logger/wandb.yaml: e.g. lam-linear-shakespeare-s7, bigram-shakespeare-s7
    "lam.run_name": lambda _root_: "-".join([*run_labels(_root_), f"s{_root_.seed}"]),
    "lam.run_tags": lambda _root_: [*run_labels(_root_), *_root_.get("tags", [])],  # plus the run's own tags
}
for name, resolver in RESOLVERS.items():
    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, resolver)


def config_dir() -> Path:
    """`conf/` of the repository, or its copy inside an installed wheel."""
    installed = Path(__file__).parent / "conf"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def compose_train(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """conf/train.yaml with the overrides, its run folder set to `output_dir`, as `python -m lam.train` hands it
    to `lam.train.train` (for tests, benchmarks and notebooks): Hydra's own config is set, so ${hydra:...}
    resolves (the wandb run's name reads the group choices), and left out of the tree."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"], return_hydra_config=True)
        except HydraException as e:
            raise composition_error(e) from None
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def composition_error(exc: HydraException) -> UserError:
    """Hydra's refusal of an override (a key the config lacks, a group option that is not there, a value its
    grammar cannot read), in one line."""
    text = str(exc)
    if found := re.search(r"Could not override '([^']+)'", text):
        key = found.group(1)
        hint = "it is a key of data=custom: add data=custom" if key == "data.path" else \
            "python -m lam.train --cfg job prints the keys there are"
        return UserError(f"{key} is not a key of this config; {hint}")
    if found := re.search(r"Could not find '([^']+)/([^'/]+)'", text):
        options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)*)", text)
        listed = ", ".join(options.group(1).split()) if options else "none"
        return UserError(f"{found.group(1)}={found.group(2)} is not an option of conf/{found.group(1)}/: {listed}")
    return UserError(f"cannot read the overrides: {text.splitlines()[0]}")


def user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, also when Hydra's instantiate wrapped it; a mandatory value (???) left unset
    is one too."""
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        if isinstance(exc, MissingMandatoryValue):
            return UserError(f"{exc.full_key} has no value: give one on the command line, {exc.full_key}=...")
        exc = exc.__cause__ or exc.__context__
    return None


def report_user_errors(fn: Callable) -> Callable:
    """Print a UserError as one line on stderr and exit with status 1; let every other error through."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:  # the reader left (`... | head`): nothing more to write, and no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail
            sys.exit(1)
        except Exception as e:
            if (err := user_error(e)) is None:
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper


def hydra_quoted(text: str) -> str:
    """`text` as a quoted value of Hydra's override grammar that reads back as exactly `text`: quotes and the
    backslashes before them escaped, and `${` kept from being read as an interpolation."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)  # OmegaConf's escape
    return "'" + text + "'"


def quote_overrides(args: Sequence[str], text_keys: Sequence[str] = ()) -> list[str]:
    """Command-line arguments with the values Hydra's grammar would misread quoted, so that `prompt=O Romeo,
    Romeo!` or `data.path=notes (1).txt` mean what they say: a value of a `text_keys` key unless it is a quoted
    string already (else its commas would make a sweep and its outer spaces would be trimmed), and any other
    `key=value` that Hydra cannot parse as it stands. Flags and what Hydra can parse pass unchanged."""
    parser, out = OverridesParser.create(), []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and re.fullmatch(r"[+~]{0,2}[\w.@/-]+", key):
            try:
                parsed = parser.parse_override(arg)
            except HydraException:
                parsed = None
            quoted = parsed is not None and value.lstrip()[:1] in ("'", '"') and isinstance(parsed.value(), str)
            if parsed is None or (key.lstrip("+~") in text_keys and not quoted):
                arg = f"{key}={hydra_quoted(value)}"
        out.append(arg)
    return out


def override_key(override: str) -> str:
    """The config key a command-line override sets: `data.path` for `data.path=x.txt` and `+data.path=x.txt`."""
    return override.split("=", 1)[0].lstrip("+~")


def path_is_custom(overrides: list[str]) -> list[str]:
    """The overrides, with data=custom added where a data.path= comes without a data=: only the custom corpus
    reads a path (the others read their download)."""
    keys = [override_key(o) if "=" in o and not o.startswith("-") else None for o in overrides]  # flags: None
    if "data.path" not in keys or "data" in keys:
        return overrides
    at = keys.index("data.path") + 1  # beside it: argparse reads Hydra's overrides as one run of arguments
    return [*overrides[:at], "data=custom", *overrides[at:]]


def command_line(*text_keys: str, corpus: bool = False) -> Callable:
    """For a `hydra.main` entry point: quote its command line's values with `quote_overrides` before Hydra
    reads them; with `corpus` (commands that compose train.yaml's data) a data.path= alone is a custom corpus
    (`path_is_custom`)."""

    def decorate(main: Callable) -> Callable:
        @wraps(main)
        def run(*args, **kwargs):
            argv = quote_overrides(sys.argv[1:], text_keys)
            sys.argv[1:] = path_is_custom(argv) if corpus else argv
            return main(*args, **kwargs)

        return run

    return decorate


def check_device(device: str, setting: str | None = None, instead: str = "device=cpu") -> None:
    """A UserError unless `device` names a device this machine has (cpu, cuda, cuda:1, mps). The message
    names `setting` (default: device=<device>) and suggests `instead`."""
    setting = setting or f"device={device}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{setting} is not a device; use cpu, cuda, cuda:<index> or mps") from None
    kind = parsed.type
    if kind == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        have = f"{torch.cuda.device_count()} CUDA GPU(s)" if torch.cuda.is_available() else "no CUDA GPU"
        raise UserError(f"{setting}: this machine has {have} (torch {torch.__version__}); use {instead}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{setting}: this machine has no MPS device; use {instead}")


def set_threads(threads) -> None:
    """torch.set_num_threads(threads) for an entry point's `threads` key; None leaves torch's choice."""
    if threads is None:
        return
    if type(threads) is not int or threads < 1:
        raise UserError(f"threads takes an integer from 1 up, or null, got {threads!r}")
    torch.set_num_threads(threads)


def output_file(path: str | Path, example: str, key: str = "out") -> Path:
    """`path` as a file an entry point may write: a UserError naming `key` if it is a folder (suggesting the
    file `example` in it) or its folder does not exist."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{key}={path} is a folder; give a file name, e.g. {key}={path / example}")
    if not path.parent.is_dir():
        raise UserError(f"{key}={path}: folder {path.parent} does not exist")
    try:  # a file made and removed again: a folder that takes no file is refused before any work
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise UserError(f"{key}={path}: folder {path.parent} takes no new file ({e.strerror})") from None
    return path
