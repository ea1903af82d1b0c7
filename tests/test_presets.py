"""The seeds' own models: each preset composes, and its size is within 10% of the figure its seed's page gives."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import compose_train
from lam.training.finetune import adapt, parameter_counts

# preset: (the seed's figure, which count it is); the figures are those of the preset headers' sources
SEEDS = {
    "babygpt": (24_000, "params"),  # BabyGPT's page: "around 24k parametres"
    "babygpt_lora": (15_000, "trainable_params"),  # BabyGPT's page: "LoRa model ... (15k parametres)"
    "tinygpt": (10_788_929, "params"),  # the lecture's gpt.py that tinyGPT and Tiny_GPT follow
    "tiny_gpt": (10_788_929, "params"),
}


def build(preset: str, tmp_path):
    cfg = compose_train([f"experiment={preset}"], tmp_path)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model, vocab_size=datamodule.vocab_size)  # the preset's corpus's alphabet
    if cfg.get("lora"):
        adapt(net, OmegaConf.to_container(cfg.lora, resolve=True))
    return cfg, net


@pytest.mark.parametrize("preset", SEEDS)
def test_preset_reproduces_its_seeds_parameter_count(preset, tmp_path):
    figure, kind = SEEDS[preset]
    _, net = build(preset, tmp_path)
    assert parameter_counts(net)[kind] == pytest.approx(figure, rel=0.10)


def test_tiny_gpt_has_relu_and_a_90_10_split_and_the_big_presets_train_on_a_gpu(tmp_path):
    cfg, net = build("tiny_gpt", tmp_path)
    assert isinstance(net.blocks[0].mlp.act, torch.nn.ReLU) and cfg.data.val_fraction == 0.1
    assert cfg.trainer.accelerator == "gpu" and compose_train(["experiment=babygpt"], tmp_path).trainer.accelerator \
        == "cpu"
