"""Byte-level BPE training time and compression on Tiny Shakespeare, at a few vocabulary sizes.

    python -m benchmarks.bpe_train [--vocab-sizes 1024 2048 4096]

Reads tinyshakespeare.txt from $LAM_DATA_DIR (downloading it there if missing). chars/token is measured on the
text the BPE was trained on (all of it), as in nanoGPT's data preparation.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from lam.data.bpe import BPETokenizer
from lam.data.corpora import Download

TINY_SHAKESPEARE = Download(
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    filename="tinyshakespeare.txt",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    args = parser.parse_args(argv)
    text = TINY_SHAKESPEARE.fetch().read_text(encoding="utf-8")
    print(f"Tiny Shakespeare: {len(text):,} chars; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'vocab':>6} {'train s':>8} {'encode s':>9} {'tokens':>9} {'chars/token':>12}")
    for vocab_size in args.vocab_sizes:
        tok = BPETokenizer(vocab_size=vocab_size)
        start = time.perf_counter()
        tok.train(text)
        trained = time.perf_counter()
        ids = tok.encode(text)
        encoded = time.perf_counter()
        print(f"{vocab_size:>6} {trained - start:>8.2f} {encoded - trained:>9.2f} {len(ids):>9,} "
              f"{len(text) / len(ids):>12.2f}")


if __name__ == "__main__":
    main()
