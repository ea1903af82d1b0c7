"""Sweeps: a Hydra grid multirun, an Optuna search, the wandb sweep file's command, the SLURM launcher."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import OmegaConf

from helpers import SHORT_RUN, compose_train
from lam.config import config_dir

SWEEP_FILE = config_dir().parent / "experiments" / "sweeps" / "lr_attention.yml"


def lam_train_multirun(tmp_path, corpus, *overrides) -> tuple[subprocess.CompletedProcess, object]:
    """`python -m lam.train -m ...` in a subprocess, into tmp_path/sweep; its output is shown if it fails."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "lam.train", "-m", *overrides, "data=custom",
                           f"data.path={corpus}", f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, capture_output=True, check=False, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, sweep


@pytest.mark.slow
def test_grid_multirun_gives_each_run_a_folder_and_summarises_them(grid_sweep):
    sweep = grid_sweep
    assert sorted(p.name for p in sweep.parent.iterdir()) == ["sweep"]  # nothing written outside the sweep folder
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]

    configs = [OmegaConf.load(job / ".hydra" / "config.yaml") for job in jobs]
    assert sorted((c.attention._target_.rsplit(".", 1)[1], c.seed) for c in configs) == [
        ("LinearAttention", 1), ("LinearAttention", 2), ("SoftmaxAttention", 1), ("SoftmaxAttention", 2)]
    metrics = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    assert all(m["steps"] == 5 for m in metrics)
    assert len({m["val_loss"] for m in metrics}) == 4

    summary = json.loads((sweep / "summary.json").read_text())
    assert [j["metrics"] for j in summary["jobs"]] == metrics
    assert summary["best"]["metrics"]["val_loss"] == min(m["val_loss"] for m in metrics)
    assert {"attention=softmax", "seed=2"} <= set(summary["jobs"][3]["overrides"])
    table = (sweep / "summary.txt").read_text()
    assert "4 runs grouped by attention" in table and f"best: job {summary['best']['job']} " in table
    assert (sweep / "compare.png").stat().st_size > 0


@pytest.mark.slow
def test_optuna_search_returns_a_best_value(tmp_path, corpus):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run = [o for o in SHORT_RUN if not o.startswith("optim.lr=")]  # the width and depth of TINY stay fixed
    proc, sweep = lam_train_multirun(tmp_path, corpus, "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                                     *run, "optim.lr=interval(1e-4,3e-3)")
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    values = [json.loads((sweep / job / "metrics.json").read_text())["val_loss"] for job in ("0", "1")]
    assert results.best_value == pytest.approx(min(values))
    assert set(results.best_params) == {"optim.lr", "attention"}
    assert 1e-4 <= results.best_params["optim.lr"] <= 3e-3
    assert "Best value" in proc.stdout + proc.stderr
    assert json.loads((sweep / "summary.json").read_text())["best"]["metrics"]["val_loss"] == min(values)


def agent_command(sweep: dict) -> list[str]:
    """The command wandb's agent would run for a trial taking the first value (or the minimum) of each
    parameter, built with wandb's own formatting of the parameters."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    trial = {name: {"value": p["values"][0] if "values" in p else p["min"]}
             for name, p in sweep["parameters"].items()}
    macros = {**create_sweep_command_args({"args": trial}),
              "env": ["/usr/bin/env"], "interpreter": ["python"]}
    command = []
    for chunk in map(str, sweep["command"]):
        command += macros[chunk[2:-1]] if chunk.startswith("${") else [chunk]
    return command


def test_wandb_sweep_file_runs_lam_train_with_hydra_overrides(tmp_path):
    sweep = yaml.safe_load(SWEEP_FILE.read_text())
    assert sweep["metric"] == {"name": "val/loss", "goal": "minimize"}
    command = agent_command(sweep)
    assert command[:6] == ["/usr/bin/env", "WANDB_MODE=online", "python", "-m", "lam.train", "logger=wandb"]
    overrides = command[5:]
    cfg = compose_train(overrides, tmp_path)
    assert cfg.optim.lr == sweep["parameters"]["optim.lr"]["min"]
    assert cfg.attention._target_.endswith(".LinearAttention")
    assert cfg.logger.wandb._target_ == "lightning.pytorch.loggers.WandbLogger"


def test_slurm_launcher_is_sized_from_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert get_object(launcher._target_).__name__ == "SlurmLauncher"
