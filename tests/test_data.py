"""The data pipeline: token cache (reuse, rebuild, crashes, races, dtype), splits, document joins, the
`python -m lam.prepare` statistics, the tokenizer in the run folder, and a BPE training run end to end."""

from __future__ import annotations

import functools
import itertools
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hydra.utils import instantiate

from helpers import TINY, compose_train, write_corpus
from lam.config import user_error
from lam.data import CharTokenizer, Tokenizer, load_tokenizer
from lam.training.datamodule import TextDataModule
from lam.data.bpe import BPETokenizer
from lam.data.corpora import read_text
from lam.training.datamodule import token_dtype
from lam.data.tokenizer import check_same_tokenizer
from lam.errors import UserError
from lam.generate import load_checkpoint
from lam.train import train


def datamodule(path, cache, tokenizer=None, **kwargs) -> TextDataModule:
    return TextDataModule.from_path(str(path), tokenizer=tokenizer or CharTokenizer(), cache_dir=str(cache),
                                    block_size=8, **kwargs)


def cached_ids(dm: TextDataModule) -> tuple[list[int], list[int]]:
    dm.setup()
    return dm.splits["train"].tolist(), dm.splits["val"].tolist()


def write_docs(folder, texts: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("tokenizer", [CharTokenizer, lambda: BPETokenizer(vocab_size=300)], ids=["char", "bpe"])
def test_round_trip_through_the_cached_ids(tokenizer, corpus, tmp_path):
    dm = datamodule(corpus, tmp_path, tokenizer())
    train_ids, val_ids = cached_ids(dm)
    text = corpus.read_text()
    cut = int(len(text) * 0.9)
    assert dm.tokenizer.decode(train_ids) == text[:cut] and dm.tokenizer.decode(val_ids) == text[cut:]
    assert dm.meta["characters"] == {"train": cut, "val": len(text) - cut}
    assert dm.meta["tokens"] == {"train": len(train_ids), "val": len(val_ids)} and dm.meta["documents"] == 1
    assert dm.splits["train"].dtype == np.uint16


def test_cache_is_reused_and_rebuilt_when_the_corpus_changes(corpus, tmp_path, monkeypatch):
    encoded = []
    encode = CharTokenizer.encode
    monkeypatch.setattr(CharTokenizer, "encode", lambda self, text: encoded.append(text) or encode(self, text))
    path = tmp_path / "corpus.txt"
    path.write_text(corpus.read_text())
    first = datamodule(path, tmp_path / "cache")
    first_ids = cached_ids(first)
    assert encoded
    encoded.clear()
    meta_written = (first.cache_dir / "meta.json").stat().st_mtime_ns

    second = datamodule(path, tmp_path / "cache")
    assert cached_ids(second) == first_ids and second.cache_dir == first.cache_dir
    assert not encoded and (first.cache_dir / "meta.json").stat().st_mtime_ns == meta_written

    path.write_text(corpus.read_text() + "The queen rides.\n")
    third = datamodule(path, tmp_path / "cache")
    assert third.cache_dir != first.cache_dir
    assert third.tokenizer.decode(cached_ids(third)[1]).endswith("The queen rides.\n") and encoded

    # the key covers the tokenizer's settings too
    keys = {datamodule(path, tmp_path, BPETokenizer(vocab_size=v)).cache_dir for v in (300, 301)}
    assert len(keys) == 2


DOCS = {f"{i}.txt": f"Document {i} of the corpus.\n" * 20 for i in range(3)}


def prepare_with_hook(folder, cache, before_encode):
    """Prepare the cache (in a forked process), calling `before_encode(n)` before the n-th piece is encoded."""
    encode, calls = CharTokenizer.encode, itertools.count(1)

    def hooked(self, text):
        before_encode(next(calls))
        return encode(self, text)

    CharTokenizer.encode = hooked
    datamodule(folder, cache).prepare_data()


def stall_at_second_piece(encoding, n):
    """Stop for good at the second piece to encode, once `encoding` is set."""
    if n == 2:
        encoding.set()
        time.sleep(600)


def wait_before_first_piece(barrier, n):
    """Wait at `barrier` before encoding, so that both runs are building the cache at once."""
    if n == 1:
        barrier.wait(60)


def test_killed_preparation_leaves_no_trusted_cache(tmp_path):
    folder, cache = write_docs(tmp_path / "docs", DOCS), tmp_path / "cache"
    fork = multiprocessing.get_context("fork")
    encoding = fork.Event()
    child = fork.Process(target=prepare_with_hook,
                         args=(folder, cache, functools.partial(stall_at_second_piece, encoding)))
    child.start()
    assert encoding.wait(60)
    child.kill()
    child.join()
    assert child.exitcode == -signal.SIGKILL

    [leftover] = cache.iterdir()  # the killed run's temporary folder, under a name no run reads
    assert not list(cache.glob("*/meta.json"))
    dm = datamodule(folder, cache)
    assert leftover.name.startswith(f".{dm.cache_dir.name}.")
    train_ids, val_ids = cached_ids(dm)  # rebuilt from scratch
    assert dm.tokenizer.decode(train_ids + val_ids) == "\n\n".join(DOCS.values())


def test_concurrent_preparations_do_not_corrupt_the_cache(tmp_path):
    folder, cache = write_docs(tmp_path / "docs", DOCS), tmp_path / "cache"
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(2)
    hook = functools.partial(wait_before_first_piece, barrier)
    runs = [fork.Process(target=prepare_with_hook, args=(folder, cache, hook)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(120)
    assert [run.exitcode for run in runs] == [0, 0]
    dm = datamodule(folder, cache)
    assert [p.name for p in cache.iterdir()] == [dm.cache_dir.name]  # one entry, no temporary folder left
    train_ids, val_ids = cached_ids(dm)
    assert dm.tokenizer.decode(train_ids + val_ids) == "\n\n".join(DOCS.values())


class WideTokenizer(Tokenizer):
    """Characters as ids from 65,536 up: a vocabulary too large for uint16."""

    vocab_size = 70_000

    def encode(self, text):
        return [65_536 + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 65_536) for i in ids)

    def config(self):
        return {}


def test_ids_are_uint16_when_the_vocabulary_fits_else_uint32(corpus, tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    dm = datamodule(corpus, tmp_path, WideTokenizer())
    train_ids, val_ids = cached_ids(dm)
    assert dm.meta["dtype"] == "uint32" and dm.splits["train"].dtype == np.uint32
    assert dm.tokenizer.decode(train_ids + val_ids) == corpus.read_text()
    assert max(train_ids) > 65_535


def test_val_path_is_the_validation_split(tmp_path):
    train_docs = {"a.txt": "The king walks to the castle.\n" * 10, "b.txt": "My lord speaks at night.\n" * 10}
    folder = write_docs(tmp_path / "train", train_docs)
    (tmp_path / "held_out.txt").write_text("Sweet queen, the day.\n" * 5)
    dm = datamodule(folder, tmp_path / "cache", val_path=str(tmp_path / "held_out.txt"))
    train_ids, val_ids = cached_ids(dm)
    assert dm.tokenizer.decode(train_ids) == "\n\n".join(train_docs.values())
    assert dm.tokenizer.decode(val_ids) == "Sweet queen, the day.\n" * 5
    assert dm.meta["documents"] == 3 and dm.meta["characters"]["val"] == 5 * 22
    other = datamodule(folder, tmp_path / "cache", val_path=str(tmp_path / "held_out.txt"), val_fraction=0.5)
    assert other.cache_dir == dm.cache_dir  # a separate validation corpus makes val_fraction irrelevant


def test_bpe_joins_documents_with_end_of_text_and_learns_from_training_split_only(tmp_path):
    first = write_corpus(tmp_path / "first.txt", n_chars=10_000).read_text()
    second = "zqxj " * 200  # all of it in the last 10%: validation text
    folder = write_docs(tmp_path / "docs", {"1.txt": first, "2.txt": second})
    dm = datamodule(folder, tmp_path / "cache", BPETokenizer(vocab_size=300))
    train_ids, val_ids = cached_ids(dm)
    ids = train_ids + val_ids
    eot = dm.tokenizer.eot_id
    assert ids.count(eot) == 1 and eot in val_ids
    at = ids.index(eot)
    assert dm.tokenizer.decode(ids[:at]) == first and dm.tokenizer.decode(ids[at + 1 :]) == second
    assert not any("zq" in token or "xj" in token for token in dm.tokenizer.ranks)
    assert any(" the" in token for token in dm.tokenizer.ranks)


def test_read_text_streams_utf8_and_names_the_offset_of_a_bad_byte(tmp_path):
    text = "Thé kïng — 王 speaks.\nA second line 😀 ends here.\n" * 3
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(read_text(path, block_bytes=7))  # characters split across blocks
    assert "".join(pieces) == text and len(pieces) > 3
    bad = text.encode() + b"ok \xff"
    path.write_bytes(bad)
    with pytest.raises(UserError, match=rf"text.txt is not UTF-8 text: invalid byte 0xff at offset {len(bad) - 1}"):
        list(read_text(path, block_bytes=7))
    assert "".join(read_text(path, errors="replace", block_bytes=7)).endswith("ok \ufffd")


def test_a_folders_empty_files_are_skipped_and_a_folder_of_only_empty_files_refused(tmp_path):
    """An empty document adds no break between the others; only a folder with no text at all is refused."""
    text = "to be or not to be, that is the question\n" * 4
    folder = write_docs(tmp_path / "docs", {"a.txt": "", "b.txt": text, "c.txt": " \n\n"})
    dm = datamodule(folder, tmp_path / "cache")
    train_ids, val_ids = cached_ids(dm)
    assert dm.tokenizer.decode(train_ids + val_ids) == text
    blank = write_docs(tmp_path / "blank", {"a.txt": "", "b.txt": " \n"})
    with pytest.raises(UserError, match=r"^\S*blank: all 2 files matching '\*\*/\*\.txt' are empty$"):
        datamodule(blank, tmp_path / "cache").prepare_data()


def test_bad_input_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty is an empty folder"):
        datamodule(tmp_path / "empty", tmp_path / "cache").prepare_data()

    cfg = compose_train(["data=custom", "data.path=x.txt", "tokenizer=bpe", "tokenizer.vocab_size=200"], tmp_path)
    with pytest.raises(Exception) as error:
        instantiate(cfg.data)
    assert str(user_error(error.value)) == \
        "BPE vocab_size=200 is too small: it needs at least 256 (bytes) + 1 (special tokens) = 257"


def test_cli_prepares_and_prints_statistics(corpus, tmp_path):
    env = {**os.environ, "LAM_CACHE_DIR": str(tmp_path / "cache")}
    args = ["data=custom", f"data.path={corpus}", "tokenizer=bpe", "tokenizer.vocab_size=300"]
    result = subprocess.run([sys.executable, "-m", "lam.prepare", *args], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    [entry] = (tmp_path / "cache").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    chars, tokens = sum(meta["characters"].values()), sum(meta["tokens"].values())
    out = result.stdout
    assert "data=custom tokenizer=bpe" in out and f"cache: {entry}\n" in out
    for label, value in [("documents", "1"), ("characters", f"{chars:,}"), ("tokens", f"{tokens:,}"),
                         ("characters per token", f"{chars / tokens:.2f}"), ("vocabulary", "300 (uint16)")]:
        assert any(label in line and value in line for line in out.splitlines()), (label, value, out)
    assert chars == len(corpus.read_text()) and chars / tokens > 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no outputs/ run folder


@pytest.mark.slow
def test_bpe_training_run_saves_its_tokenizer_in_the_run_folder(corpus, tmp_path):
    out = tmp_path / "run"
    overrides = [*TINY, "data=custom", f"data.path={corpus}", "tokenizer=bpe", "tokenizer.vocab_size=300",
                 "trainer.max_steps=20"]
    cfg = compose_train(overrides, out)
    assert train(cfg) < math.log(300)  # better than a uniform guess
    assert json.loads((out / "metrics.json").read_text())["steps"] == 20

    saved = load_tokenizer(out / "tokenizer.json")
    dm = instantiate(cfg.data)
    train_ids, _ = cached_ids(dm)
    text = corpus.read_text()
    assert isinstance(saved, BPETokenizer) and saved.vocab_size == 300
    assert saved.encode(text[: int(len(text) * 0.9)]) == train_ids

    _, from_checkpoint = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert check_same_tokenizer(out / "tokenizer.json", from_checkpoint, "the checkpoint").encode(text) == \
        from_checkpoint.encode(text)
    CharTokenizer("abc").save(tmp_path / "other.json")
    with pytest.raises(UserError, match=r"other.json \(CharTokenizer, 3 tokens, .*\) differs from the one the "
                                        r"checkpoint was trained with \(BPETokenizer, 300 tokens"):
        check_same_tokenizer(tmp_path / "other.json", from_checkpoint, "the checkpoint")
    result = subprocess.run([sys.executable, "-m", "lam.generate", f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
                             f"tokenizer_file={tmp_path / 'other.json'}"], capture_output=True, text=True)
    assert result.returncode == 1 and "differs from the one checkpoint" in result.stderr.splitlines()[-1]
