"""The model file: export -> load gives the same network (torch.equal logits, the same greedy text, the tie
restored) for every attention mechanism and both position schemes, and for an untied head with every model
option on; each broken or hostile file is refused in one line; a write is atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

import lam
from helpers import TINY_MODEL, compose_train
from lam.data.corpora import corpus_name
from lam.data.tokenizer import CharTokenizer, describe
from lam.errors import UserError
from lam.export import export
from lam.models.decoder import ReLUSquared
from lam.serving import model_file
from lam.serving.build import build
from lam.serving.model import Model

pytestmark = pytest.mark.usefixtures("one_thread")

ATTENTIONS = ["softmax", "window", "linear", "retention", "gated"]
TOKENIZER = CharTokenizer("\n abcdefghijklmnopqrstuvwxyz.")


def model_config(tmp_path, attention: str, pos: str, *overrides: str) -> dict:
    cfg = compose_train([*TINY_MODEL, "data=custom", f"data.path={tmp_path}/c.txt", "data.block_size=16",
                         f"attention={attention}", f"model.pos={pos}", *overrides], tmp_path)
    return OmegaConf.to_container(cfg.model, resolve=True)


def write_checkpoint(tmp_path, config: dict, seed: int = 0):
    """A checkpoint as lam.train writes one (the entries export reads), of a randomly initialised network."""
    torch.manual_seed(seed)
    net = build(config, "test", vocab_size=TOKENIZER.vocab_size)
    path = tmp_path / "run.ckpt"
    torch.save({"global_step": 7, "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "callbacks": {"ModelCheckpoint{...}": {"monitor": "val/loss", "current_score": torch.tensor(1.5)}},
                "lam": {"config": {"model": config, "data": {"path": "corpus.txt"}},
                        "tokenizer": TOKENIZER.state_dict()}}, path)
    return net.eval(), path


def greedy(net, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by recomputing the context (the last block_size tokens) at every step."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(net(torch.tensor([ids[-net.block_size:]]))[0][0, -1].argmax()))
    return ids


def export_and_load(tmp_path, config: dict):
    """The network of a checkpoint of `config`, and the model its exported file loads as: equal logits."""
    net, ckpt = write_checkpoint(tmp_path, config)
    export(ckpt, tmp_path / "m.lam")
    m = lam.load(tmp_path / "m.lam")
    x = torch.randint(TOKENIZER.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m.net(x)[0], net(x)[0])
    return net, m


@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_export_then_load_gives_the_same_model(attention, pos, tmp_path):
    config = model_config(tmp_path, attention, pos)
    net, m = export_and_load(tmp_path, config)
    assert m.net.lm_head.weight is m.net.wte.weight  # the tie restored
    with safetensors.safe_open(tmp_path / "m.lam", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "wte.weight" in f.keys()  # stored once
        meta = f.metadata()
    assert json.loads(meta["tied"]) == {"lm_head.weight": "wte.weight"}
    assert meta["format"] == "lam-model" and json.loads(meta["config"]) == config
    assert int(meta["parameters"]) == sum(p.numel() for p in net.parameters())
    assert json.loads(meta["record"])["steps"] == 7 and json.loads(meta["record"])["val_loss"] == 1.5
    prompt = TOKENIZER.encode("the king")
    expected = TOKENIZER.decode(greedy(net, prompt, 24)[len(prompt):])
    assert m.generate("the king", max_new_tokens=24, temperature=0) == expected
    assert "".join(m.stream("the king", max_new_tokens=24, temperature=0)) == expected
    info = m.info
    assert info["block_size"] == 16 and info["vocab_size"] == TOKENIZER.vocab_size and info["pos"] == pos
    assert info["parameters"] == int(meta["parameters"]) and info["record"]["corpus"] == "corpus.txt"


OPTIONS = ["model.qk_norm=true", "model.activation=relu2", "model.tie_head=false"]


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_an_untied_head_with_every_option_exports_and_loads_as_it_was(attention, tmp_path):
    config = model_config(tmp_path, attention, "rope", *OPTIONS)
    _, m = export_and_load(tmp_path, config)
    assert m.net.lm_head.weight is not m.net.wte.weight and m.net.blocks[0].attn.qk_norm
    assert isinstance(m.net.blocks[0].mlp.act, ReLUSquared)
    assert not torch.equal(m.net.lm_head.weight, m.net.wte.weight)
    with safetensors.safe_open(tmp_path / "m.lam", "pt") as f:
        assert {"lm_head.weight", "wte.weight"} <= set(f.keys()) and json.loads(f.metadata()["tied"]) == {}
        assert json.loads(f.metadata()["config"]) == config


def test_a_file_whose_config_ties_weights_it_stores_apart_is_refused(tmp_path):
    """Loading both into the one tied tensor would keep the last and give another model without a word."""
    untied = build(model_config(tmp_path, "softmax", "rope", "model.tie_head=false"), "test",
                   vocab_size=TOKENIZER.vocab_size)
    model_file.save(tmp_path / "m.lam", untied, TOKENIZER, model_config(tmp_path, "softmax", "rope"), {})
    with pytest.raises(UserError, match=r"ties no weights, but its model config ties \{'lm_head.weight': "):
        model_file.read(tmp_path / "m.lam")


def test_perplexity_is_the_exp_of_the_mean_loss_over_windows(tmp_path):
    net, ckpt = write_checkpoint(tmp_path, model_config(tmp_path, "softmax", "learned"))
    export(ckpt, tmp_path / "m.lam")
    m = lam.load(tmp_path / "m.lam")
    text = "the king speaks to the queen. " * 3
    ids = torch.tensor(TOKENIZER.encode(text))
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 16):
            piece = ids[start:start + 17]
            logits = net(piece[None, :-1])[0][0]
            losses += torch.nn.functional.cross_entropy(logits, piece[1:], reduction="none").tolist()
    assert m.perplexity(text) == pytest.approx(torch.tensor(losses).mean().exp().item(), rel=1e-6)
    with pytest.raises(TypeError, match="^text must be one string, got list$"):
        m.perplexity([text])
    for call in (m.generate, m.stream):
        with pytest.raises(TypeError, match="^prompt must be one string, got list$"):
            "".join(call(["the king", "the queen"], max_new_tokens=3))


def refusals(tmp_path, marker):
    """name: (model file, what its one-line error says)."""
    _, ckpt = write_checkpoint(tmp_path, model_config(tmp_path, "softmax", "rope"))
    good = export(ckpt, tmp_path / "good.lam") and tmp_path / "good.lam"
    data = good.read_bytes()
    truncated = tmp_path / "truncated.lam"
    truncated.write_bytes(data[: len(data) - 100])
    changed = tmp_path / "changed.lam"
    changed.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the last byte of the tensor data
    with safetensors.safe_open(good, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    def rewritten(name, **entries):  # a file with other metadata and a sha256 that matches them
        new = {**meta, **entries}
        new["sha256"] = model_file.digest(tensors, new)
        safetensors.torch.save_file(tensors, tmp_path / name, new)
        return tmp_path / name

    touch = ["touch", str(marker)]
    config = json.loads(meta["config"])
    foreign = rewritten("target.lam", config=json.dumps({**config, "attention": {
        "_target_": "subprocess.run", "args": touch, "_partial_": True}}))
    tokenizer = rewritten("tokenizer.lam", tokenizer=json.dumps({"class": "subprocess.Popen", "args": touch}))
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tensors, plain)
    text = tmp_path / "notes.lam"
    text.write_text("hello, not a model\n")
    return {
        "truncated": (truncated, "is truncated or damaged"),
        "changed byte": (changed, "has changed since it was written"),
        "foreign target": (foreign, "model.attention._target_ is 'subprocess.run'"),
        "foreign tokenizer": (tokenizer, "tokenizer class 'subprocess.Popen' is not one of LAM's"),
        "not LAM's": (plain, "is not a LAM model file"),
        "not safetensors": (text, "is not a LAM model file"),
        "newer version": (rewritten("v2.lam", version="2"), "of version 2; this LAM reads version 1"),
        "huge config": (rewritten("huge.lam", config=json.dumps({**config, "n_embd": 2**20})),  # TBs of weights
                        "does not match its model config: wte.weight is"),
    }


CASES = ["truncated", "changed byte", "foreign target", "foreign tokenizer", "not LAM's", "not safetensors",
         "newer version", "huge config"]


@pytest.mark.parametrize("case", CASES)
def test_a_broken_or_hostile_model_file_is_refused(case, tmp_path):
    marker = tmp_path / "marker"
    path, message = refusals(tmp_path, marker)[case]
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        lam.load(path)
    assert not marker.exists()


def test_generate_refuses_a_changed_file_in_one_line_and_exits_1(tmp_path):
    marker = tmp_path / "marker"
    path, message = refusals(tmp_path, marker)["foreign target"]
    result = subprocess.run([sys.executable, "-m", "lam.generate", f"model={path}"], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert not marker.exists()


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch):
    net, ckpt = write_checkpoint(tmp_path, model_config(tmp_path, "linear", "rope"))
    export(ckpt, tmp_path / "m.lam")
    before = (tmp_path / "m.lam").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, tmp_path / "m.lam")
    assert (tmp_path / "m.lam").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_export_cli_writes_the_file_and_names_it(tmp_path):
    _, ckpt = write_checkpoint(tmp_path, model_config(tmp_path, "retention", "learned"))
    result = subprocess.run([sys.executable, "-m", "lam.export", f"ckpt={ckpt}", f"out={tmp_path / 'x.lam'}"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'x.lam'}" in result.stdout and lam.load(tmp_path / "x.lam").info["attention"] == \
        "Retention"
    result = subprocess.run([sys.executable, "-m", "lam.generate", f"model={tmp_path / 'x.lam'}", "seed=null",
                             "max_new_tokens=5", "prompt=the"], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # a fresh seed
    assert result.returncode == 0 and result.stdout.startswith("the"), result.stderr
    result = subprocess.run([sys.executable, "-m", "lam.export", f"ckpt={ckpt}", f"out={tmp_path}/no/x.lam"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stderr.strip() == f"error: out={tmp_path}/no/x.lam: folder " \
                                                               f"{tmp_path}/no does not exist"
    result = subprocess.run([sys.executable, "-m", "lam.export", f"ckpt={ckpt}", "out=/proc/x.lam"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stderr.startswith("error: out=/proc/x.lam: folder /proc takes no new "
                                                               "file (")  # its reason: root's or a user's
    assert len(result.stderr.strip().splitlines()) == 1
    before = sorted(tmp_path.iterdir())
    result = subprocess.run([sys.executable, "-m", "lam.export", f"ckpt={ckpt}", f"out={tmp_path}"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stderr.strip() == f"error: out={tmp_path} is a folder; give a file " \
                                                               f"name, e.g. out={tmp_path / 'model.lam'}"
    assert sorted(tmp_path.iterdir()) == before and not list(tmp_path.parent.glob(f".{tmp_path.name}*.tmp"))


def test_lam_load_needs_neither_lightning_nor_hydra(tmp_path):
    _, ckpt = write_checkpoint(tmp_path, model_config(tmp_path, "gated", "rope"))
    export(ckpt, tmp_path / "m.lam")
    code = ("import sys, lam; m = lam.load(sys.argv[1]); m.generate('ab', 3); m.perplexity('the king'); "
            "print(sorted({k.split('.')[0] for k in sys.modules} & {'lightning', 'pytorch_lightning', 'hydra', "
            "'omegaconf'}))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.lam")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("data, corpus", [
    ("stan", "https://raw.githubusercontent.com/soumyadip1995/BabyGPT/main/data/text.txt"),
    ("custom", "notes.txt"),
])
def test_the_record_names_the_corpus_a_data_config_reads(data, corpus, tmp_path):
    cfg = compose_train([f"data={data}", "data.path=notes.txt"] if data == "custom" else [f"data={data}"], tmp_path)
    assert corpus_name(OmegaConf.to_container(cfg.data, resolve=True)) == corpus
    old = {"_target_": "lam.data.TextDataModule", "source": {"_target_": "lam.data.Download", "url": corpus}}
    assert corpus_name(old) == corpus  # a checkpoint's config from before the source keys moved up


def test_a_models_summary_names_its_attention_and_positions_or_its_class(tmp_path):
    _, lam_model = export_and_load(tmp_path, model_config(tmp_path, "retention", "rope"))
    assert lam_model.summary().startswith(f"{lam_model.info['parameters']:,} parameters, Retention, rope positions, "
                                          "CharTokenizer")
    bigram = Model(build({"_target_": "lam.models.Bigram"}, "test", vocab_size=TOKENIZER.vocab_size), TOKENIZER,
                   {"_target_": "lam.models.Bigram"})
    assert bigram.summary() == f"{TOKENIZER.vocab_size ** 2:,} parameters, Bigram, {describe(TOKENIZER)}"


def test_paths_with_a_tilde_are_the_home_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _, ckpt = write_checkpoint(tmp_path, model_config(tmp_path, "linear", "learned"))
    export("~/run.ckpt", "~/m.lam")
    assert (tmp_path / "m.lam").is_file() and lam.load("~/m.lam").info["attention"] == "LinearAttention"
