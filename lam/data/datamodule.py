"""The LightningDataModule: text -> tokenizer -> cached token ids -> batches of windows.

Token ids are encoded once per (corpus content, tokenizer settings, split) and kept as memory-mapped `.bin`
files in the cache folder; a run that finds them reuses them. The cache entry is built in a temporary folder
and renamed into place, so a crash never leaves an entry that a later run would trust, and runs preparing the
same corpus at once do not disturb each other.

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
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lam.data.corpora import LocalText
from lam.data.tokenizer import Tokenizer, load_tokenizer
from lam.errors import UserError

ENCODE_PIECE_CHARS = 1 << 20  # text is encoded (and its ids written) one ~1M-character piece at a time


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
    val_fraction: share of the text (its end) held out for validation; eval_batches: validation batches;
    cache_dir: where token ids are cached (default: $LAM_CACHE_DIR, else ~/.cache/lam/tokens)."""

    def __init__(self, source, tokenizer: Tokenizer, block_size: int = 64, batch_size: int = 12,
                 val_fraction: float = 0.1, eval_batches: int = 20, num_workers: int = 0, seed: int = 1337,
                 cache_dir: str | None = None):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise UserError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
        self.source, self.tokenizer = source, tokenizer
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.eval_batches, self.num_workers, self.seed = eval_batches, num_workers, seed
        self.splits: dict[str, np.ndarray] = {}
        default = os.environ.get("LAM_CACHE_DIR") or Path.home() / ".cache" / "lam" / "tokens"
        self.cache_root = Path(cache_dir or default).expanduser()

    @classmethod
    def from_path(cls, path: str, glob: str = "**/*.txt", errors: str = "strict", **kwargs) -> TextDataModule:
        """A DataModule over the user's own text: a file, or the files under a folder matching `glob`."""
        return cls(LocalText(path, glob, errors), **kwargs)

    # ---- the token cache ------------------------------------------------------------------------------------
    @cached_property
    def cache_dir(self) -> Path:
        """The cache entry, keyed by corpus content, the untrained tokenizer's settings and the split."""
        key = {"corpus": self.source.fingerprint(), "tokenizer": self.tokenizer.state_dict(),
               "val_fraction": self.val_fraction}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.cache_root / digest

    def prepare_data(self) -> None:
        """Build the cache entry unless it exists: read, split, train the tokenizer, encode, write."""
        final = self.cache_dir
        if (final / "meta.json").exists():
            return
        text = "\n\n".join(doc for _, doc in self.source.documents())
        if not text.strip():
            raise UserError("the corpus is empty")
        cut = int(len(text) * (1 - self.val_fraction))
        splits = {"train": text[:cut], "val": text[cut:]}
        tokenizer = self.tokenizer
        if tokenizer.needs_training:
            tokenizer.train(text if getattr(tokenizer, "vocab_from_all_text", False) else splits["train"])
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            counts = {name: self._encode(split, tmp / f"{name}.bin", dtype) for name, split in splits.items()}
            tokenizer.save(tmp / "tokenizer.json")
            meta = {"dtype": np.dtype(dtype).name, "tokens": counts, "characters": len(text),
                    "vocab_size": tokenizer.vocab_size}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                tmp.rename(final)
            except OSError:  # another process finished the same entry first: keep theirs
                if not (final / "meta.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _encode(self, text: str, path: Path, dtype) -> int:
        count = 0
        with open(path, "wb") as f, Progress(transient=True) as progress:
            task = progress.add_task(f"encoding {path.stem}", total=len(text))
            start = 0
            while start < len(text):
                end = text.find("\n", start + ENCODE_PIECE_CHARS) + 1 or len(text)
                ids = np.asarray(self.tokenizer.encode(text[start:end]), dtype=dtype)
                f.write(ids.tobytes())
                count += len(ids)
                progress.update(task, completed=end)
                start = end
        return count

    # ---- splits and loaders ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()
        cache = self.cache_dir
        meta = json.loads((cache / "meta.json").read_text())
        self.tokenizer = load_tokenizer(cache / "tokenizer.json")
        for name in ("train", "val"):
            tokens = np.memmap(cache / f"{name}.bin", dtype=meta["dtype"], mode="r")
            if len(tokens) < self.block_size + 1:
                raise UserError(f"data.block_size={self.block_size} does not fit: the {name} split has only "
                                f"{len(tokens)} tokens; use data.block_size<={len(tokens) - 1} or more text")
            self.splits[name] = tokens

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
