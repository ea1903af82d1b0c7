"""Every config composes and builds; configs travel inside the wheel."""

import itertools
import os
import subprocess
import sys
import zipfile

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from helpers import compose_train
from lam.training.runs import flatten
from lam.config import config_dir
from lam.errors import UserError
from lam.training.precision import AUTO, cpu_precision

CONF = config_dir()
ROOT = CONF.parent


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model,attention,data", itertools.product(
    choices("model"), choices("attention"), choices("data")))
def test_every_combination_composes_and_builds_a_model(model, attention, data, tmp_path):
    cfg = compose_train([f"model={model}", f"attention={attention}", f"data={data}", "data.path=x.txt"]
                        if data == "custom" else [f"model={model}", f"attention={attention}", f"data={data}"],
                        tmp_path)
    OmegaConf.resolve(cfg)
    net = instantiate(cfg.model, vocab_size=65)
    assert sum(p.numel() for p in net.parameters()) > 0
    assert type(instantiate(cfg.data)).__name__ == "TextDataModule"


def targets(node):
    """Every `_target_` in a config tree of plain dicts and lists."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from targets(value)


# groups of train.yaml (apps: the other entry points' own config root)
GROUPS = [p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment", "apps")]


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_group_yaml_composes_and_its_targets_exist(group, choice, tmp_path):
    overrides = [f"{group}={choice}", "data=custom", "data.path=x.txt"] if group != "data" else \
        [f"data={choice}", *(["data.path=x.txt"] if choice == "custom" else [])]
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    compose_train(overrides, tmp_path)
    tree = OmegaConf.load(CONF / group / f"{choice}.yaml")  # the file's own targets
    if group == "hparams_search":  # the sweeper and its sampler, from the plugin's configs, under hydra.
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            tree = compose("train", [f"hparams_search={choice}"], return_hydra_config=True).hydra.sweeper
    found = list(targets(OmegaConf.to_container(tree)))
    if group == "hparams_search":
        assert len(found) == 2
    for target in found:
        assert get_object(target) is not None


def test_cpu_trainer_callbacks_and_loggers_build(tmp_path):
    """The default trainer builds once lam.train has replaced precision=auto (which Lightning does not know) by
    a precision; unmeasured, that is the CPU's."""
    cfg = compose_train([], tmp_path)
    assert cfg.trainer.precision == AUTO
    cfg.trainer.precision = cpu_precision()
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_every_experiment_sets_its_values_and_builds(experiment, tmp_path):
    """Each value the preset file sets (its defaults list and hydra: settings aside) is what the composed
    config holds, and the model builds."""
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    preset = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    own = [(key, value) for key, value in flatten(OmegaConf.to_container(preset)).items()
           if not key.startswith(("defaults", "hydra."))]
    assert own
    for key, value in own:
        assert OmegaConf.select(cfg, key) == value, key
    net = instantiate(cfg.model, vocab_size=65)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_unknown_group_option_or_key_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^attention=quadratic is not an option of conf/attention/: gated, linear, "
                                        r"retention, softmax, window$"):
        compose_train(["attention=quadratic"], tmp_path)
    with pytest.raises(UserError, match=r"^model.depth is not a key of this config; python -m lam.train --cfg job "):
        compose_train(["model.depth=3"], tmp_path)
    with pytest.raises(UserError, match=r"^data.path is not a key of this config; it is a key of data=custom"):
        compose_train(["data.path=x.txt"], tmp_path)
    with pytest.raises(UserError, match=r"^cannot read the overrides: "):
        compose_train(["trainer.max_steps=[1"], tmp_path)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """LAM's wheel, built from the repository and installed (without dependencies) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp), str(ROOT)], check=True)
    wheel, = tmp.glob("lam-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp / "site"),
                    str(wheel)], check=True)
    return wheel, tmp / "site"


def test_wheel_carries_the_configs_once(installed_wheel):
    wheel, _ = installed_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lam/conf/train.yaml" in names and "lam/conf/attention/linear.yaml" in names
    presets = sorted(n for n in names if n.endswith("shakespeare_char_cpu.yaml"))
    assert presets == ["lam/conf/experiment/shakespeare_char_cpu.yaml"]


def test_installed_wheel_finds_the_presets_outside_the_repository(installed_wheel, tmp_path):
    _, site = installed_wheel
    code = ("from lam.config import compose_train, config_dir; print(config_dir()); "
            "print(compose_train(['experiment=shakespeare_char_fast'], '.').task_name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(site)}).stdout.split()
    assert out == [str(site / "lam" / "conf"), "shakespeare_char_fast"]


@pytest.mark.parametrize("env,mode", [(None, "offline"), ("online", "online"), ("disabled", "disabled")])
def test_wandb_is_offline_unless_wandb_mode_says_otherwise(env, mode, tmp_path, monkeypatch):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert compose_train(["logger=wandb"], tmp_path).logger.wandb.mode == mode


@pytest.mark.parametrize("model,name", [("lam", "lam-softmax-stan-s7"), ("bigram", "bigram-stan-s7"),
                                        ("ngram", "ngram-stan-s7")])
def test_wandb_names_and_tags_a_run_by_what_it_trained(model, name, tmp_path):
    """The attention is in the name only of a model that takes one; tags=[...] join the tags."""
    cfg = compose_train(["logger=wandb", f"model={model}", "attention=softmax", "data=stan", "seed=7",
                         "tags=[baseline,v2]"], tmp_path)
    assert cfg.logger.wandb.name == name
    assert list(cfg.logger.wandb.tags) == [*name.split("-")[:-1], "baseline", "v2"]
