"""python -m lam.eval model=x.lam | ckpt=PATH [data=custom data.path=...] [out=eval.json] [data.* ...]

Loss, perplexity and bits per character of a model on a corpus's validation split, by the protocol of training's
validation: the data module's windows (data.eval_batches x data.batch_size, spread evenly over the split, of the
model's block size unless data.block_size says otherwise), the mean next-token loss over their tokens. Keys other
than model, ckpt, out and device are overrides of lam.train's config (data=..., data.path=..., data.*); a
data.path= alone is a custom corpus, and with neither data= nor data.path= the corpus is the one the model's
record names. It is encoded with the model's own tokenizer. Prints one line and writes the numbers to `out` as JSON.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lam.config import (compose_train, config_dir, hydra_quoted, output_file, override_key, path_is_custom,
                        quote_overrides, report_user_errors)
from lam.errors import UserError
from lam.data.corpora import corpus_name
from lam.generate import load_model
from lam.serving.model import Model
from lam.training.tracking import write_json

OWN_KEYS = {"model": None, "ckpt": None, "out": "eval.json", "device": "cpu"}


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """(this command's keys, the overrides for lam.train's config)."""
    own, overrides = dict(OWN_KEYS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"{arg!r} is not key=value; e.g. python -m lam.eval model=x.lam data=custom "
                            "data.path=corpus.txt")
        if key in own:
            own[key] = value
        else:
            overrides.append(arg)
    return own, quote_overrides(overrides)


@torch.no_grad()
def evaluate(model: Model, datamodule) -> dict:
    """Loss (nats per token), perplexity and bits per character over the validation windows of `datamodule`."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    total, tokens, characters = 0.0, 0, 0
    for x, y in datamodule.val_dataloader():
        x, y = x.to(model.device), y.to(model.device)
        logits = model.net(x)[0]
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        tokens += y.numel()
        characters += sum(len(model.tokenizer.decode(row)) for row in y.tolist())
    if not tokens:
        raise UserError("the validation split holds no window: use a larger corpus or a smaller data.block_size")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": total / math.log(2) / characters,
            "tokens": tokens, "characters": characters}


def training_corpus(model: Model, source: str) -> list[str]:
    """The overrides that select the corpus `model` was trained on, as its record names it: the data group
    whose url it is, or a custom corpus's path (which must exist from here); none if the record names none."""
    corpus = model.record.get("corpus")
    if not corpus:
        return []
    for group in sorted((config_dir() / "data").glob("*.yaml")):
        if OmegaConf.load(group).get("url") == corpus:
            return [f"data={group.stem}"]
    if not Path(corpus).is_file():
        raise UserError(f"{source} was trained on {corpus}, which is not found from here; give the corpus: "
                        "data=custom data.path=<file>, or data=shakespeare / data=stan")
    return ["data=custom", f"data.path={hydra_quoted(corpus)}"]


def run(argv: list[str]) -> dict:
    own, overrides = parse(argv)
    out = output_file(own["out"], "eval.json")
    model, source = load_model(own["model"], own["ckpt"], own["device"])
    if not any(override_key(o) in ("data", "data.path") for o in overrides):
        overrides = [*training_corpus(model, source), *overrides]
    overrides = path_is_custom(overrides)
    if not any(override_key(o) == "data.block_size" for o in overrides) and model.info["block_size"]:
        overrides.append(f"data.block_size={model.info['block_size']}")
    with tempfile.TemporaryDirectory() as folder:
        cfg = compose_train([*overrides, "data.save_dir=null"], folder)
        learned = getattr(model.net, "max_context", None)  # the positions it learned; None: any length
        if learned and cfg.data.block_size > learned:
            raise UserError(f"{source} learned positions for {learned} tokens, so data.block_size="
                            f"{cfg.data.block_size} is too long: set data.block_size<={learned}")
        datamodule = instantiate(cfg.data, tokenizer=model.tokenizer)
        result = {"model": source, "corpus": corpus_name(OmegaConf.to_container(cfg.data, resolve=True)),
                  "block_size": cfg.data.block_size, **evaluate(model, datamodule)}
    write_json(out, result)  # a reader sees the old file or the new one
    print(f"{source}: val loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
          f"{result['bits_per_char']:.4f} bits per character over {result['tokens']:,} tokens; wrote {out}")
    return result


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    run(argv)


if __name__ == "__main__":
    main()
