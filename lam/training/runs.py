"""Training runs read back from their folders alone (no wandb needed): each run's .hydra/ config,
csv/metrics.csv and, once it finished, metrics.json; the comparison table and plot that `python -m lam.compare`
and the sweep summary show. Runs that share every config value but the seed form a group; the table has one row
per group, with mean ± std over its seeds. Lower is better: best = the lowest value logged.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from rich.table import Table


# config keys (and their subtrees) that never split runs into groups: seeds are averaged over, the rest is
# where and how a run was recorded
NOT_COMPARED = ("seed", "tags", "paths", "logger", "callbacks")
GROUP_NODE = re.compile(r"\$\{(\w+)\}")  # a value that is a whole config group, e.g. model.attention: ${attention}


def model_groups(model_values, groups) -> list[str]:
    """"model" and the groups the model's config takes in whole: ["model", "attention"] for the LAM decoder,
    whose attention key is ${attention}; ["model"] for the bigram, which has no attention. `model_values`: the
    model config's unresolved values; `groups`: the config groups there are (Hydra's choices)."""
    taken = [m.group(1) for v in model_values if isinstance(v, str) and (m := GROUP_NODE.fullmatch(v))]
    return ["model", *(g for g in dict.fromkeys(taken) if g in groups and g != "model")]


@dataclass
class Run:
    path: Path
    choices: dict     # Hydra's group choices, e.g. {"attention": "linear", "model": "lam"}
    config: dict      # the config flattened to dotted keys, unresolved, e.g. {"optim.lr": 0.001}
    steps: list       # the steps at which the metric was logged
    values: list      # the metric at those steps
    seconds: list     # training time at those steps (elapsed_s: validations and samples left out)
    result: dict      # metrics.json ({} while the run has not finished)

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def model_groups(self) -> list[str]:
        """The choices that say what was trained: the model's and those of the groups its config takes."""
        return model_groups((v for k, v in self.config.items() if k.startswith("model.")), self.choices)


def natural_key(path: Path) -> list:
    """Sort key that puts multirun job 2 before job 10."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(path))]


def expand(arg: str) -> list[Path]:
    """The paths a command-line argument names: a glob's matches, else the path itself where it exists."""
    if glob.has_magic(arg):
        return [Path(p) for p in sorted(glob.glob(arg))]
    return [Path(arg)] if Path(arg).exists() else []


def find_runs(args: list[str]) -> list[Path]:
    """Run folders (those holding .hydra/config.yaml) given, or found below the folders given; globs
    expand."""
    runs = set()
    for arg in args:
        for path in expand(arg):
            if (path / ".hydra" / "config.yaml").is_file():
                runs.add(path)
            else:
                runs.update(config.parent.parent for config in path.rglob(".hydra/config.yaml"))
    return sorted(runs, key=natural_key)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def csv_columns(path: Path) -> list[str]:
    """The metric names in a run's csv/metrics.csv header (none without the file)."""
    metrics_csv = path / "csv" / "metrics.csv"
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as f:
        return next(csv.reader(f), [])


def load_run(path: Path, metric: str) -> Run:
    hydra_dir = path / ".hydra"
    config = flatten(OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False))
    hydra = OmegaConf.load(hydra_dir / "hydra.yaml").hydra if (hydra_dir / "hydra.yaml").is_file() else None
    choices = {k: v for k, v in (hydra.runtime.choices.items() if hydra else []) if not k.startswith("hydra")}
    metrics_csv = path / "csv" / "metrics.csv"
    rows = list(csv.DictReader(metrics_csv.open())) if metrics_csv.is_file() else []
    logged = [(int(r["step"]), number(r[metric])) for r in rows if number(r.get(metric)) is not None]
    # elapsed_s is logged every few steps: the metric's steps read their training time off the line through them
    clock = [(0, 0.0)] + [(int(r["step"]), number(r["elapsed_s"])) for r in rows if r.get("elapsed_s")]
    steps = [s for s, _ in logged]
    seconds = np.interp(steps, [s for s, _ in clock], [t for _, t in clock]).tolist()
    result = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    choices.update(result.get("trained", {}))  # the model init_from= gave, in place of the composed one
    if "precision" in result:  # what the run trained at, where its config says auto or ${lam.cpu_precision:}
        config["trainer.precision"] = result["precision"]
    return Run(path, choices, config, steps, [v for _, v in logged], seconds, result)


def differing_keys(runs: list[Run]) -> list[str]:
    """The choices and config keys whose values differ between runs, seeds and recording aside. A config key
    inside a group whose choice differs (attention.* when attention=linear,softmax) is left to the choice."""
    def differ(key, get):
        return len({repr(get(run, key)) for run in runs}) > 1

    choices = [k for k in dict.fromkeys(k for run in runs for k in run.choices)
               if k not in NOT_COMPARED and differ(k, lambda run, k: run.choices.get(k))]
    skipped = (*NOT_COMPARED, *choices)
    config = [k for k in dict.fromkeys(k for run in runs for k in run.config)
              if k.split(".")[0] not in skipped and differ(k, lambda run, k: run.config.get(k))]
    return choices + config


def value(run: Run, key: str):
    return run.choices[key] if key in run.choices else run.config.get(key)


def group_runs(runs: list[Run], keys: list[str]) -> dict[tuple, list[Run]]:
    """Runs by their values of `keys`, in the order the groups first appear."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(value(run, k) for k in keys), []).append(run)
    return groups


def si(x: float) -> str:
    """1234567 -> 1.23M"""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def mean_std(values: list, fmt) -> str:
    """'mean ± std' over the values that exist, one value when they agree, '-' when none exists."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(set(values)) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def table(runs: list[Run], metric: str) -> Table:
    keys = differing_keys(runs)
    trained = list(dict.fromkeys(g for run in runs for g in run.model_groups))  # e.g. model, attention
    shown = [k for k in keys if k not in trained]  # those have columns of their own
    root = os.path.commonpath([run.path.absolute().parent for run in runs])  # runs are named relative to it
    grouped_by = ", ".join(keys) or "nothing (all runs alike)"
    out = Table(title=f"{len(runs)} runs grouped by {grouped_by}; mean ± std over seeds",
                caption=f"{metric}: best and final; time: training wall time")
    for column in ["run", *shown, *trained, "seeds", "params", "FLOPs/token", "tokens seen",
                   f"best {metric}", f"final {metric}", "time (s)", "tokens/s"]:
        out.add_column(column, justify="left" if column in ["run", *shown, *trained] else "right")
    for group in group_runs(runs, keys).values():
        first = group[0]
        out.add_row(
            ", ".join(os.path.relpath(run.path.absolute(), root) for run in group),
            *[str(value(first, k)) for k in shown],
            *[str(first.choices.get(g, "-")) if g in first.model_groups else "-" for g in trained],
            ", ".join(str(run.seed) for run in group),
            mean_std([run.result.get("params") for run in group], si),
            mean_std([run.result.get("flops_per_token") for run in group], si),
            mean_std([run.result.get("tokens_seen") for run in group], si),
            mean_std([min(run.values, default=None) for run in group], "{:.4f}".format),
            mean_std([run.values[-1] if run.values else None for run in group], "{:.4f}".format),
            mean_std([run.result.get("wall_s") for run in group], "{:.1f}".format),
            mean_std([run.result.get("tokens_per_sec") for run in group], si),
        )
    return out


def plot(runs: list[Run], metric: str, path: Path) -> None:
    """The metric of every run against optimizer steps done (left) and training time (right), one colour per
    group."""
    keys = differing_keys(runs)
    fig = Figure(figsize=(11, 4), layout="tight")
    FigureCanvasAgg(fig)  # rendered by Agg: no display, no global pyplot state
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for i, (values, group) in enumerate(group_runs(runs, keys).items()):
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, values)) or "runs"
        for j, run in enumerate(group):
            style = {"color": f"C{i}", "alpha": 0.8, "label": label if j == 0 else None, "marker": "."}
            by_step.plot(run.steps, run.values, **style)
            by_time.plot(run.seconds, run.values, **style)
    by_step.set(xlabel="optimizer steps done", ylabel=metric, title=f"{metric} by step")
    by_time.set(xlabel="training time (s)", title=f"{metric} by training time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
