"""Multiruns: a summary of all runs at the end of a sweep, and DDP jobs inside a sweep.

`SweepSummary` is a Hydra callback (conf/hydra/default.yaml): when a multirun ends it writes, in the sweep
folder, summary.json (each job's overrides and metrics.json, and the best job), summary.txt (the `lam.compare`
table) and compare.png (`lam.compare`'s plot).

Lightning's `ddp` strategy starts ranks 1..n-1 by running the command line again. Inside a multirun that
command line is the whole sweep, so each rank would run every job (and, under Optuna, draw its own trial).
`run_as_own_process` avoids it: the job runs as a single run of its own, into the job's folder, where `ddp`
relaunches exactly that run.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from lam.training import runs as run_folders
from lam.errors import UserError

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def needs_own_process(trainer: L.Trainer) -> bool:
    """Whether this run must be started again as a process of its own: a multirun job whose strategy
    relaunches the command line for its other ranks (`ddp` without a cluster that starts the ranks itself, as
    SLURM does). Strategies that train in forked or spawned processes are refused: their ranks do not hand
    back the step count and best checkpoint that metrics.json reports."""
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        raise UserError(f"trainer.strategy={type(trainer.strategy).__name__} with start method "
                        f"'{launcher._start_method}' is not supported: use trainer.strategy=ddp, which also "
                        "works inside multiruns (-m)")
    return in_multirun() and isinstance(launcher, _SubprocessScriptLauncher)


def run_as_own_process() -> float:
    """Run this multirun job as a single run of `lam.train` with the job's own overrides, into the job's
    folder, and return its final validation loss. The job's .hydra/ (written by the multirun) is kept."""
    hydra = HydraConfig.get()
    output_dir = Path(hydra.runtime.output_dir)
    command = [sys.executable, "-m", "lam.train", *hydra.overrides.task,
               f"hydra.run.dir={output_dir}", "hydra.output_subdir=null"]
    log.info("DDP inside a multirun: job %s runs as its own process: %s", hydra.job.num, " ".join(command))
    subprocess.run(command, check=True)
    return json.loads((output_dir / "metrics.json").read_text())["val_loss"]


def job_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each job folder's name, overrides and metrics.json ({} for a job that did not finish), in job order."""
    jobs = []
    for run in run_folders.find_runs([str(sweep_dir)]):
        overrides = run / ".hydra" / "overrides.yaml"
        metrics = run / "metrics.json"
        jobs.append({"job": run.relative_to(sweep_dir).as_posix(),
                     "overrides": list(OmegaConf.load(overrides)) if overrides.is_file() else [],
                     "metrics": json.loads(metrics.read_text()) if metrics.is_file() else {}})
    return jobs


def summarize(sweep_dir: Path, metric: str = "val/loss") -> dict[str, Any] | None:
    """Write summary.json, summary.txt and compare.png into `sweep_dir` and return the summary (None: no job)."""
    jobs = job_results(sweep_dir)
    if not jobs:
        return None
    finished = [j for j in jobs if j["metrics"].get("val_loss") is not None]
    best = min(finished, key=lambda j: j["metrics"]["val_loss"], default=None)
    summary = {"sweep_dir": str(sweep_dir), "jobs": jobs, "best": best}
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    runs = [run_folders.load_run(sweep_dir / j["job"], metric) for j in jobs]
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(run_folders.table(runs, metric))
    if best is not None:
        varied = [o for o in best["overrides"] if not all(o in job["overrides"] for job in jobs)]
        console.print(f"best: job {best['job']} ({' '.join(varied)}), "
                      f"val_loss {best['metrics']['val_loss']:.4f}")
    (sweep_dir / "summary.txt").write_text(console.export_text())
    if any(run.values for run in runs):
        run_folders.plot(runs, metric, sweep_dir / "compare.png")
    return summary


class SweepSummary(Callback):
    """Hydra callback: summarise every job of a multirun into its sweep folder when the multirun ends."""

    def __init__(self, metric: str = "val/loss"):
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            if summarize(sweep_dir, self.metric) is not None:
                log.info("sweep summary: %s", sweep_dir / "summary.txt")
        except Exception:  # the jobs are done, their folders intact: a failed summary must not fail the sweep
            log.exception("could not summarise %s; python -m lam.compare %s shows it", sweep_dir, sweep_dir)
