"""lam.compare: runs found in a real multirun folder, best losses as the runs logged them, seeds averaged."""

import csv
import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import column, read_metrics
from lam.compare import main
from lam.training.precision import cpu_precision
from lam.training.runs import differing_keys, find_runs, load_run, table

def test_compare_reports_each_runs_best_loss_and_writes_a_png(grid_sweep, tmp_path, capsys):
    multirun = grid_sweep  # attention=linear,softmax seed=1,2
    runs = find_runs([str(multirun)])
    assert runs == [multirun / str(job) for job in range(4)] == find_runs([f"{multirun}/*"])
    png = tmp_path / "plots" / "curves.png"
    main([str(multirun), "--png", str(png)])
    out = capsys.readouterr().out
    assert "grouped by attention" in out
    bests = {}
    for run in runs:
        best = min(v for _, v in column(read_metrics(run), "val/loss"))
        assert best == pytest.approx(json.loads((run / "metrics.json").read_text())["best_val_loss"])
        assert min(load_run(run, "val/loss").values) == best
        bests.setdefault(load_run(run, "val/loss").choices["attention"], []).append(best)
        # the config says ${lam.cpu_precision:}; the run's record says what that was on this machine
        assert json.loads((run / "metrics.json").read_text())["precision"] == cpu_precision()
    assert sorted(bests) == ["linear", "softmax"]
    for attention, (a, b) in bests.items():  # one row per attention, its two seeds' mean ± std
        assert f"{statistics.mean([a, b]):.4f} ± {statistics.stdev([a, b]):.4f}" in out, attention
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000


def fake_run(path: Path, seed: int, lr: float, val_losses: list[float], model: str = "lam",
             precision: str = "32-true") -> Path:
    """A run folder as lam.train leaves it, with made-up losses; the LAM decoder takes the attention group,
    the bigram does not. The config leaves the precision to the CPU; metrics.json says what it was."""
    (path / ".hydra").mkdir(parents=True)
    model_config = {"_target_": "lam.models.LAM", "attention": "${attention}", "block_size": "${data.block_size}"} \
        if model == "lam" else {"_target_": "lam.models.Bigram"}
    OmegaConf.save({"seed": seed, "model": model_config, "optim": {"lr": lr}, "paths": {"output_dir": str(path)},
                    "trainer": {"precision": "${lam.cpu_precision:}"}}, path / ".hydra" / "config.yaml")
    choices = {"model": model, "attention": "linear", "data": "shakespeare", "hydra/launcher": "basic"}
    OmegaConf.save({"hydra": {"runtime": {"choices": choices}}}, path / ".hydra" / "hydra.yaml")
    (path / "csv").mkdir()
    with open(path / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "elapsed_s", "val/loss"])
        writer.writeheader()
        for i, loss in enumerate(val_losses):
            writer.writerow({"step": 10 * (i + 1), "elapsed_s": i + 1.0, "val/loss": loss})
    (path / "metrics.json").write_text(json.dumps({"params": 1000, "tokens_seen": 5000, "wall_s": 2.0,
                                                   "precision": precision}))
    return path


def test_runs_differing_only_in_seed_are_averaged(tmp_path, capsys):
    fake_run(tmp_path / "a", seed=1, lr=1e-3, val_losses=[3.0, 2.0])
    fake_run(tmp_path / "b", seed=2, lr=1e-3, val_losses=[3.0, 2.2, 2.4])
    fake_run(tmp_path / "c", seed=1, lr=3e-3, val_losses=[2.5])
    runs = [load_run(path, "val/loss") for path in find_runs([str(tmp_path)])]
    assert differing_keys(runs) == ["optim.lr"]
    assert [run.model_groups for run in runs] == [["model", "attention"]] * 3
    assert runs[1].seconds == [1.0, 2.0, 3.0]  # wall time at each logged step

    main([str(tmp_path), "--png", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "2.1000 ± 0.1414" in out  # best: 2.0 and 2.2; final: 2.0 and 2.4
    assert "2.2000 ± 0.2828" in out and "2.5000" in out and "1e+03" not in out
    rows = table(runs, "val/loss").row_count
    assert rows == 2


def test_runs_at_another_precision_are_not_averaged_with_them(tmp_path):
    """One config on a bf16 CPU and on an AVX2 CPU: ${lam.cpu_precision:} chose bf16-mixed on one and 32-true on
    the other, and metrics.json says which, so the runs are two groups and the table names the precision."""
    fake_run(tmp_path / "a", seed=1, lr=1e-3, val_losses=[2.0], precision="bf16-mixed")
    fake_run(tmp_path / "b", seed=2, lr=1e-3, val_losses=[2.2], precision="32-true")
    runs = [load_run(path, "val/loss") for path in find_runs([str(tmp_path)])]
    assert differing_keys(runs) == ["trainer.precision"]
    cells = {c.header: list(c.cells) for c in table(runs, "val/loss").columns}
    assert cells["trainer.precision"] == ["bf16-mixed", "32-true"]


def test_no_runs_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path)])
    assert exit.value.code == 1 and "no runs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path), str(tmp_path / "gone")])
    assert exit.value.code == 1 and capsys.readouterr().err.strip() == f"error: {tmp_path / 'gone'} does not exist"
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "gone*")])
    assert exit.value.code == 1 and capsys.readouterr().err.strip() == f"error: {tmp_path / 'gone*'} matches nothing"


def test_a_quoted_glob_is_expanded(tmp_path, capsys):
    fake_run(tmp_path / "run1", seed=1, lr=1e-3, val_losses=[2.0])
    fake_run(tmp_path / "run2", seed=1, lr=3e-3, val_losses=[2.5])
    fake_run(tmp_path / "other", seed=1, lr=1e-2, val_losses=[3.0])
    main([str(tmp_path / "run*"), "--png", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "0.001" in out and "0.003" in out and "0.01 " not in out and "3.0000" not in out


def test_a_metric_no_run_logged_is_a_one_line_error_naming_the_logged_ones(tmp_path, capsys):
    fake_run(tmp_path / "a", seed=1, lr=1e-3, val_losses=[3.0])
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path), "--metric", "val_loss"])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.strip() == "error: no run has logged 'val_loss' in its csv/metrics.csv; " \
        "logged: elapsed_s, val/loss"


def test_columns_name_the_groups_each_model_takes(tmp_path):
    """A bigram run has no attention: its row says so, although Hydra composed the attention group."""
    lam_run = load_run(fake_run(tmp_path / "a", seed=1, lr=1e-3, val_losses=[2.0]), "val/loss")
    bigram_run = load_run(fake_run(tmp_path / "b", seed=1, lr=1e-3, val_losses=[2.5], model="bigram"), "val/loss")
    assert [lam_run.model_groups, bigram_run.model_groups] == [["model", "attention"], ["model"]]
    both = table([lam_run, bigram_run], "val/loss")
    assert [c.header for c in both.columns][:3] == ["run", "model", "attention"]
    cells = {c.header: list(c.cells) for c in both.columns}
    assert cells["model"] == ["lam", "bigram"] and cells["attention"] == ["linear", "-"]
    assert "attention" not in [c.header for c in table([bigram_run], "val/loss").columns]
