"""The LightningDataModule: text -> tokenizer -> cached token ids -> batches of windows.

Preparation streams the corpus file by file, in pieces of about 1 MB, so neither the text nor its ids need
to fit in memory: one pass counts the characters (and checks the UTF-8), one trains the tokenizer if it
needs training, one encodes the pieces and appends their ids to the split's `.bin` file. The validation split
is the last `val_fraction` of the characters, or a corpus of its own. A tokenizer learns from the training
split only (byte-level BPE counts the pre-tokens of all of it, piece by piece), except the char tokenizer,
which takes its alphabet from all the text. Documents are joined with the tokenizer's end-of-text token, or
with a blank line where it has none.

Token ids are cached once per (corpus content, tokenizer settings, split), as uint16 when the vocabulary fits
and uint32 otherwise, in memory-mapped `.bin` files; a run that finds them reuses them. A cache entry is built
in a temporary folder and renamed into place when complete, so a crash never leaves an entry that a later run
would trust, and runs preparing the same corpus at once do not disturb each other (the first rename wins). A
killed preparation leaves its temporary folder (`.<key>.*`, beside the entry) behind, never to be read.

Training batches are random windows of `block_size + 1` tokens. Batch number i on rank r depends only on
(seed, r, i), so a resumed run sees exactly the batches the uninterrupted run would have seen, and ranks never
share a batch stream. Validation uses a fixed set of windows spread evenly over the validation split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from functools import cached_property
from itertools import takewhile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lam.data.corpora import Download, LocalText, read_text, text_length
from lam.data.paths import default_cache_dir
from lam.data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer
from lam.errors import UserError

CACHE_FORMAT = 2  # part of the cache key: bumped when an entry's layout changes, so old entries go unread
DOCUMENT_BREAK = "\n\n"  # joins documents for a tokenizer without an end-of-text token


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest type for token ids: uint16 for up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def track(pieces: Iterable, description: str, total: int) -> Iterator:
    """`pieces` passed through, with a progress bar on stderr advancing by the length of each text piece."""
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total)
        for piece in pieces:
            yield piece
            if isinstance(piece, str):
                progress.advance(task, len(piece))


def split_pieces(documents: list[tuple[Path, str]], cut: int,
                 joiner: str | int | None = None) -> Iterator[tuple[str, str | int]]:
    """("train" | "val", piece) for the documents in order: their text in pieces, with `joiner` (text, or a
    token id) between two documents of the same split. The first `cut` characters are the training split."""
    seen = 0
    for i, (path, errors) in enumerate(documents):
        if i and joiner is not None and seen != cut:
            yield ("train" if seen < cut else "val"), joiner
        for text in read_text(path, errors):
            if seen < cut < seen + len(text):
                yield "train", text[: cut - seen]
                yield "val", text[cut - seen :]
            else:
                yield ("train" if seen < cut else "val"), text
            seen += len(text)


def with_text(corpus: Download | LocalText) -> list[tuple[Path, str, int]]:
    """(path, errors, characters) of each file of the corpus that holds more than whitespace, in order; a
    UserError where none does."""
    sized = [(path, corpus.errors, text_length(path, corpus.errors)) for path in corpus.files()]
    if not (documents := [document for document in sized if document[2]]):
        raise UserError(f"{sized[0][0]} is empty" if len(sized) == 1 else
                        f"{corpus.path}: all {len(sized)} files matching {corpus.glob!r} are empty")
    return documents


FALLBACKS = "\ufffd? "  # what errors=replace reads a character outside a given alphabet as: the first it has


def replacements(tokenizer: Tokenizer, documents: list[tuple[Path, str]]) -> dict[int, str]:
    """For a char tokenizer whose alphabet is given (a fine-tuned model's): a str.translate table sending each
    character of the documents that the alphabet lacks to a fallback it has, where the documents are read with
    errors="replace"; a UserError naming those characters where they are read strictly. Empty otherwise."""
    if not isinstance(tokenizer, CharTokenizer) or tokenizer.needs_training:
        return {}
    missing: dict[str, str] = {}  # character -> the errors setting of the first document that has it
    for path, errors in documents:
        for text in read_text(path, errors):
            for c in set(text).difference(tokenizer.stoi):
                missing.setdefault(c, errors)
    fallback = next((c for c in FALLBACKS if c in tokenizer.stoi), tokenizer.chars[0])
    if strict := sorted(c for c, errors in missing.items() if errors != "replace"):
        shown = " ".join(map(repr, strict[:20])) + (f" and {len(strict) - 20} more" if len(strict) > 20 else "")
        raise UserError(f"the text has {len(strict)} character{'s' * (len(strict) > 1)} outside the tokenizer's "
                        f"alphabet of {tokenizer.vocab_size}: {shown}; data.errors=replace reads each as {fallback!r}")
    return {ord(c): fallback for c in missing}


@rank_zero_only
def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """Write `folder`/tokenizer.json, once per run (on rank 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder / "tokenizer.json")


class RandomWindows(IterableDataset):
    """An endless stream of (x, y) batches of random windows, y = x shifted by one token."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 start: int = 0):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.start = seed, rank, start

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, i])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        windows = self.tokens[starts[:, None] + np.arange(self.block_size + 1)]
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self):
        worker = get_worker_info()
        i, step = (self.start, 1) if worker is None else (self.start + worker.id, worker.num_workers)
        while True:
            yield self.batch(i)
            i += step


class EvenWindows(Dataset):
    """`count` windows at evenly spaced offsets of the split: the same evaluation every time."""

    def __init__(self, tokens: np.ndarray, block_size: int, count: int):
        self.tokens, self.block_size = tokens, block_size
        self.starts = np.linspace(0, len(tokens) - block_size - 1, count).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]
        window = torch.from_numpy(self.tokens[s : s + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]


class TextDataModule(L.LightningDataModule):
    """source: a corpus (`lam.data.corpora.Download` or `LocalText`); tokenizer: untrained `Tokenizer`;
    val_fraction: share of the text (its end) held out for validation; val_source: a corpus that is the
    validation split instead; eval_batches: validation batches; cache_dir: where token ids are cached
    (None: lam.data.paths.default_cache_dir()); save_dir: where setup() writes tokenizer.json."""

    def __init__(self, source, tokenizer: Tokenizer, block_size: int = 64, batch_size: int = 12,
                 val_fraction: float = 0.1, eval_batches: int = 20, num_workers: int = 0, seed: int = 1337,
                 cache_dir: str | None = None, val_source=None, save_dir: str | None = None):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise UserError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
        self.source, self.val_source, self.tokenizer = source, val_source, tokenizer
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.eval_batches, self.num_workers, self.seed = eval_batches, num_workers, seed
        self.splits: dict[str, np.ndarray] = {}
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.save_dir = Path(save_dir) if save_dir else None

    @classmethod
    def from_download(cls, url: str, sha256: str, filename: str, data_dir: str | None = None,
                      errors: str = "strict", **kwargs) -> TextDataModule:
        """A DataModule over a public corpus: `lam.data.corpora.Download` of `url` (checked against `sha256`)
        into `data_dir` as `filename`, or that file where it is already."""
        return cls(Download(url, sha256, filename, data_dir, errors), **kwargs)

    @classmethod
    def from_path(cls, path: str, glob: str = "**/*.txt", errors: str = "strict", val_path: str | None = None,
                  **kwargs) -> TextDataModule:
        """A DataModule over the user's own text: a file, or the files under a folder matching `glob`;
        `val_path`, another such file or folder, is the validation split instead of the end of the text."""
        val_source = LocalText(val_path, glob, errors) if val_path else None
        return cls(LocalText(path, glob, errors), val_source=val_source, **kwargs)

    # ---- the token cache ------------------------------------------------------------------------------------
    @cached_property
    def cache_dir(self) -> Path:
        """The cache entry, keyed by corpus content, the untrained tokenizer's settings and the split."""
        key = {"format": CACHE_FORMAT, "corpus": self.source.fingerprint(),
               "tokenizer": self.tokenizer.state_dict(),
               "val": self.val_source.fingerprint() if self.val_source else self.val_fraction}
        if self.source.errors != "strict":  # replaced bytes or characters make other ids than an error would
            key["errors"] = self.source.errors
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.cache_root / digest

    @property
    def meta(self) -> dict:
        """The cache entry's statistics, preparing it if need be: format, dtype, vocab_size, documents, and
        characters and tokens per split."""
        self.prepare_data()
        return json.loads((self.cache_dir / "meta.json").read_text())

    def prepare_data(self) -> None:
        """Build the cache entry unless it exists: count, split, train the tokenizer, encode, write."""
        final = self.cache_dir
        if (final / "meta.json").exists():
            return
        train = with_text(self.source)
        documents = train + (with_text(self.val_source) if self.val_source else [])
        n_train, sizes = len(train), [size for _, _, size in documents]
        documents, characters = [(path, errors) for path, errors, _ in documents], sum(sizes)
        cut = sum(sizes[:n_train]) if self.val_source else int(characters * (1 - self.val_fraction))

        tokenizer = self.tokenizer
        if tokenizer.needs_training:
            if getattr(tokenizer, "vocab_from_all_text", False):  # the char tokenizer: all it will encode
                text, total = (piece for _, piece in split_pieces(documents, cut, DOCUMENT_BREAK)), characters
            else:  # the training split, each document on its own
                train = takewhile(lambda split_piece: split_piece[0] == "train", split_pieces(documents, cut))
                text, total = (piece for _, piece in train), cut
            tokenizer.train(track(text, "reading for the tokenizer", total))
        table = replacements(tokenizer, documents)
        joiner = tokenizer.eot_id if tokenizer.eot_id is not None else DOCUMENT_BREAK
        dtype = token_dtype(tokenizer.vocab_size)

        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            tokens = {"train": 0, "val": 0}
            with open(tmp / "train.bin", "wb") as train_bin, open(tmp / "val.bin", "wb") as val_bin:
                out = {"train": train_bin, "val": val_bin}
                for split, piece in track(split_pieces(documents, cut, joiner), "encoding", characters):
                    ids = [piece] if isinstance(piece, int) else tokenizer.encode(piece.translate(table))
                    out[split].write(np.asarray(ids, dtype=dtype).tobytes())
                    tokens[split] += len(ids)
            tokenizer.save(tmp / "tokenizer.json")
            meta = {"format": CACHE_FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                    "documents": len(documents), "characters": {"train": cut, "val": characters - cut},
                    "tokens": tokens}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            for path in tmp.iterdir():  # on disk before the entry takes its final name
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            try:
                tmp.rename(final)
            except OSError:  # another process finished the same entry first: keep theirs
                if not (final / "meta.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- splits and loaders ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        meta = self.meta
        cache = self.cache_dir
        name, count = min(meta["tokens"].items(), key=lambda split: split[1])  # the hint must fit every split
        if count < self.block_size + 1:
            fix = f"use data.block_size<={count - 1} or more text" if count > 1 else "use more text"
            raise UserError(f"data.block_size={self.block_size} does not fit: the {name} split has only "
                            f"{count} tokens; {fix}")
        self.tokenizer = load_tokenizer(cache / "tokenizer.json", trusted=(type(self.tokenizer),))
        if self.save_dir:
            save_tokenizer(self.tokenizer, self.save_dir)
        self.splits = {name: np.memmap(cache / f"{name}.bin", dtype=meta["dtype"], mode="r")
                       for name in meta["tokens"]}

    @property
    def vocab_size(self) -> int:
        self.setup()
        return self.tokenizer.vocab_size

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer else 0
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        windows = RandomWindows(self.splits["train"], self.block_size, self.batch_size, self.seed, rank, start)
        return DataLoader(windows, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        windows = EvenWindows(self.splits["val"], self.block_size, self.eval_batches * self.batch_size)
        return DataLoader(windows, batch_size=self.batch_size, num_workers=self.num_workers)
