"""The debug presets (conf/debug/): each composes over any config and does what its file says; tags=[...]
reach every logger."""

import json

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import OmegaConf

from helpers import TINY, column, compose_train, read_metrics
from lam.config import config_dir
from lam.train import train

PRESETS = sorted(p.stem for p in (config_dir() / "debug").glob("*.yaml"))


def test_the_four_presets_are_there():
    assert PRESETS == ["anomaly", "fast", "overfit", "profile"]


@pytest.mark.parametrize("debug", PRESETS)
def test_each_preset_composes_over_a_preset_and_wins(debug, tmp_path):
    cfg = compose_train(["experiment=shakespeare_char_cpu", f"debug={debug}"], tmp_path)
    assert cfg.task_name == "debug"
    assert OmegaConf.to_container(cfg.model, resolve=True)["n_embd"] == 128  # the rest of the preset stays
    if debug in ("fast", "overfit", "profile"):
        assert cfg.trainer.max_steps < 2000  # the preset's 2000 steps gave way


# what the presets set: a command-line key=value would win over a preset
SET_BY_PRESETS = ("trainer.max_steps", "trainer.val_check_interval", "trainer.log_every_n_steps",
                  "scheduler.warmup_steps", "data.eval_batches", "callbacks.samples.max_new_tokens", "optim.lr")


def tiny(tmp_path, corpus, *overrides):
    """A tiny model trained on the test corpus, in full precision, as the preset among `overrides` says; its
    run folder."""
    own = [o for o in TINY if o.split("=")[0] not in SET_BY_PRESETS]
    cfg = compose_train([*own, "data=custom", f"data.path={corpus}", "trainer.precision=32-true", *overrides],
                        tmp_path)
    train(cfg)
    return tmp_path


def test_fast_runs_its_few_steps_with_a_tiny_validation(tmp_path, corpus):
    out = tiny(tmp_path, corpus, "debug=fast")
    assert len(column(read_metrics(out), "val/loss")) == 2  # at steps 5 and 10
    assert json.loads((out / "metrics.json").read_text())["steps"] == 10


def test_overfit_drives_the_loss_on_its_one_batch_toward_zero(tmp_path, corpus):
    out = tiny(tmp_path, corpus, "debug=overfit", "trainer.max_steps=150", "trainer.val_check_interval=150",
               "optim.lr=1e-2")
    losses = [loss for _, loss in column(read_metrics(out), "train/loss")]
    assert len(losses) == 150
    assert losses[0] > 2.5 and losses[-1] < 0.1 * losses[0]


def test_profile_writes_its_report_into_the_run_folder(tmp_path, corpus):
    cfg = compose_train(["debug=profile"], tmp_path)
    assert isinstance(instantiate(cfg.trainer.profiler), SimpleProfiler)
    out = tiny(tmp_path, corpus, "debug=profile", "trainer.max_steps=4", "trainer.val_check_interval=2")
    report = (out / "fit-profile.txt").read_text()
    assert "training_step" in report


class AnomalyProbe(L.Callback):
    """Records, at each training batch, whether autograd's anomaly detection is on."""
    seen: list[bool] = []

    def on_train_batch_start(self, *args) -> None:
        AnomalyProbe.seen.append(torch.is_anomaly_enabled())


def test_anomaly_turns_on_autograd_anomaly_detection(tmp_path, corpus):
    AnomalyProbe.seen.clear()
    tiny(tmp_path, corpus, "debug=anomaly", "trainer.max_steps=2", "trainer.val_check_interval=2",
         f"+callbacks.anomaly_probe._target_={__name__}.AnomalyProbe")
    assert AnomalyProbe.seen == [True, True]
    assert not torch.is_anomaly_enabled()  # only for the run


def test_tags_reach_every_loggers_hyperparameters(tmp_path, corpus):
    """tags=[...] join the wandb tags (test_configs) and the hyperparameters every logger receives."""
    out = tiny(tmp_path, corpus, "debug=fast", "tags=[baseline,v2]", "callbacks.samples=null")
    assert OmegaConf.load(out / "csv" / "hparams.yaml").tags == ["baseline", "v2"]
