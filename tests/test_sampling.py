"""Sampling: top-p (p = 1 is plain sampling, a small p is greedy, otherwise only the nucleus is drawn), stop
strings, num_samples as one batch, and one-line errors for values out of range."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lam.data.tokenizer import CharTokenizer
from lam.errors import UserError
from lam.generate import command_line_stops, sample_batch
from lam.models import LAM
from lam.models.sampling import sample_next, stream, stream_text
from lam.serving.model import check_sampling, check_switches

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(seed)) * 3


def draws(top_p: float, **kwargs) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.cat([sample_next(logits(), top_p=top_p, generator=g, **kwargs) for _ in range(200)], dim=1)


def test_top_p_one_is_plain_sampling_and_a_small_p_is_greedy():
    g = torch.Generator().manual_seed(7)
    plain = torch.cat([sample_next(logits(), generator=g) for _ in range(200)], dim=1)
    assert torch.equal(draws(1.0), plain)
    assert torch.equal(draws(1e-6), logits().argmax(-1, keepdim=True).expand(4, 200))


def test_top_p_draws_only_the_nucleus_and_all_of_it():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(probs.log(), top_p=0.7, generator=g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7: the second token completes the nucleus, the third is outside
    seen = {int(sample_next(probs.log(), top_p=0.81, generator=g)) for _ in range(300)}
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("stop, pieces", [
    (["USER:"], ["h", "i", " "]),           # held back while it could begin the stop string
    (["x", " U"], ["h", "i"]),
    ([], ["h", "i", " ", "U", "S", "E", "R", ":", " ", "o"]),
])
def test_stream_text_ends_before_a_stop_string(stop, pieces):
    tokens = iter(map(ord, "hi USER: o"))
    assert list(stream_text(tokens, lambda ids: "".join(map(chr, ids)), stop)) == pieces


def test_num_samples_runs_as_one_batch():
    torch.manual_seed(0)
    tokenizer = CharTokenizer("abcdefgh ")
    net = LAM(tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32).eval()
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    texts = sample_batch(net, tokenizer, "abc", 10, num_samples=3, temperature=0)
    assert calls == [3] * 10  # one forward per step, for all three samples
    one = tokenizer.decode(torch.cat(list(stream(net, torch.tensor([tokenizer.encode("abc")]), 10,
                                                 temperature=0)), 1)[0].tolist())
    assert texts == [one] * 3


@pytest.mark.parametrize("args, message", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=True), "temperature must be a finite number >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(frequency_penalty=2.5), "frequency_penalty must be between -2 and 2"),
    (dict(presence_penalty="high"), "presence_penalty must be between -2 and 2"),
])
def test_sampling_values_out_of_range_are_refused(args, message):
    values = dict(max_new_tokens=10, temperature=1.0, top_k=None, top_p=1.0) | args
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        check_sampling(**values)


def test_a_seed_is_an_integer_or_null_for_a_fresh_one():
    from lam.serving.model import seeded_generator

    assert seeded_generator(torch.device("cpu"), 5).initial_seed() == 5
    fresh = seeded_generator(torch.device("cpu"), None).initial_seed(), seeded_generator("cpu", None).initial_seed()
    assert fresh[0] != fresh[1]
    for bad in ("abc", True, 1.5):
        with pytest.raises(UserError, match="^seed must be an integer, or null for a fresh one"):
            seeded_generator("cpu", bad)


@pytest.mark.parametrize("switches, message", [
    (dict(compile="maybe"), "compile must be true or false, got 'maybe'"),
    (dict(use_cache=True, context_shift=1), "context_shift must be true or false, got 1"),
])
def test_switches_that_are_not_true_or_false_are_refused(switches, message):
    with pytest.raises(UserError, match=f"^{message}$"):
        check_switches(**switches)
    check_switches(use_cache=True, compile=False, context_shift=True)


@pytest.mark.parametrize("app, override, message", [
    ("generate", "top_k=0", "top_k must be an integer >= 1, or null for all tokens, got 0"),
    ("generate", "compile=maybe", "compile must be true or false, got 'maybe'"),
    ("generate", "seed=abc", "seed must be an integer, or null for a fresh one, got 'abc'"),
    ("generate", "frequency_penalty=-2.5", "frequency_penalty must be between -2 and 2 (0: none), got -2.5"),
    ("chat", "presence_penalty=3", "presence_penalty must be between -2 and 2 (0: none), got 3"),
])
def test_generate_and_chat_refuse_a_bad_value_in_one_line_before_loading(tmp_path, app, override, message):
    result = subprocess.run([sys.executable, "-m", f"lam.{app}", "ckpt=missing.ckpt", override],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {message}"


def test_stop_strings_typed_on_a_command_line_read_backslash_n_as_a_newline():
    assert command_line_stops("\\n\\n") == ["\n\n"] and command_line_stops(["a\\tb", "c"]) == ["a\tb", "c"]


def greedy(net, prompt, n, **options) -> list[int]:
    return torch.cat(list(stream(net, prompt, n, temperature=0, **options)), dim=1).flatten().tolist()


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["LinearAttention", "SoftmaxAttention"])
def test_compiled_one_token_step_decodes_the_eager_tokens(attention):
    """compile=True (torch.compile of the one-token step, of the cropped window past a learned position table's
    end, and of the shifted context's half window) picks, greedily, the tokens of the eager path: 40 tokens
    from a model of block 16, so every step runs. The recurrent state and the KV cache (15-30 s of compiling
    each; benchmarks.decode runs every mechanism)."""
    from decoding import context_sensitive_lam
    from lam.models import attention as mechanisms
    from lam.models.sampling import COMPILED

    net = context_sensitive_lam(getattr(mechanisms, attention), "learned", block_size=16).float()
    prompt = torch.randint(50, (2, 3), generator=torch.Generator().manual_seed(0))
    for shift in (False, True):
        eager = greedy(net, prompt, 40, context_shift=shift)
        assert greedy(net, prompt, 40, compile=True, context_shift=shift) == eager and len(set(eager)) > 5
    assert COMPILED[net] is not net  # it did compile (a failure would fall back to eager)


def test_a_failing_compile_falls_back_to_eager_with_the_same_tokens(monkeypatch):
    from decoding import context_sensitive_lam
    from lam.models.attention import SoftmaxAttention
    from lam.models import sampling

    net = context_sensitive_lam(SoftmaxAttention, "learned", block_size=16)
    prompt = torch.randint(50, (1, 3), generator=torch.Generator().manual_seed(0))

    def broken(*args):
        raise NameError("name 's55' is not defined")  # what inductor once raised on a KV cache

    monkeypatch.setitem(sampling.COMPILED, net, broken)
    with pytest.warns(UserWarning, match="torch.compile failed on a decoding step .NameError"):
        assert greedy(net, prompt, 20, compile=True) == greedy(net, prompt, 20)
    assert sampling.COMPILED[net] is net  # one failure: the model decodes eagerly from then on


@torch.no_grad()
def penalized_reference(net, prompt: list[int], n: int, frequency: float, presence: float) -> list[int]:
    """Greedy tokens with OpenAI's penalties, each step from the whole context recomputed: a token's logit less
    frequency times its count among the tokens sampled so far, less presence if it is among them."""
    ids, sampled = list(prompt), []
    for _ in range(n):
        logits = net(torch.tensor([ids]))[0][0, -1].tolist()
        scores = [v - frequency * sampled.count(j) - presence * (j in sampled) for j, v in enumerate(logits)]
        sampled.append(max(range(len(scores)), key=scores.__getitem__))
        ids.append(sampled[-1])
    return sampled


@pytest.mark.parametrize("frequency, presence", [(0.8, 0.0), (0.0, 1.5), (0.5, 0.5), (-1.0, 0.0)])
def test_penalties_lower_the_logits_of_the_tokens_sampled_so_far(frequency, presence):
    from decoding import context_sensitive_lam
    from lam.models.attention import LinearAttention

    net = context_sensitive_lam(LinearAttention, "rope")
    prompt = torch.randint(50, (1, 5), generator=torch.Generator().manual_seed(2))
    tokens = greedy(net, prompt, 30, frequency_penalty=frequency, presence_penalty=presence)
    assert tokens == penalized_reference(net, prompt[0].tolist(), 30, frequency, presence)
    assert tokens != greedy(net, prompt, 30)  # the penalties changed what was picked
    assert greedy(net, prompt, 30, frequency_penalty=frequency, presence_penalty=presence, use_cache=False) == tokens


def shifted_reference(net, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens under llama.cpp's context shift, each from its whole context recomputed: the last
    block_size tokens of the prompt, then, whenever the context outgrows block_size, its last half."""
    ids, limit = list(prompt), net.max_context
    begin = max(0, len(ids) - limit)
    for _ in range(n):
        if len(ids) - begin > limit:
            begin = len(ids) - limit // 2
        ids.append(int(net(torch.tensor([ids[begin:]]))[0][0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("attention", ["softmax", "linear", "gated"])
@pytest.mark.parametrize("prompt_len", [3, 20])  # shorter and longer than block_size
def test_context_shift_decodes_the_tokens_of_its_recomputed_contexts(attention, prompt_len):
    """With learned positions (block 16), 40 tokens shift the context twice or more: the cached path, the
    uncached one and a reference recomputing each context give the same tokens, other than the sliding
    window's."""
    from decoding import context_sensitive_lam
    from lam.models.attention import GatedLinearAttention, LinearAttention, SoftmaxAttention

    mechanism = {"softmax": SoftmaxAttention, "linear": LinearAttention, "gated": GatedLinearAttention}[attention]
    net = context_sensitive_lam(mechanism, "learned", block_size=16)
    prompt = torch.randint(50, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    shifted = greedy(net, prompt, 40, context_shift=True)
    assert shifted == shifted_reference(net, prompt[0].tolist(), 40) and len(set(shifted)) > 5
    assert greedy(net, prompt, 40, context_shift=True, use_cache=False) == shifted
    assert greedy(net, prompt, 40) != shifted  # the sliding window sees other contexts


def test_generate_refuses_a_bad_thread_count_before_loading():
    result = subprocess.run([sys.executable, "-m", "lam.generate", "ckpt=missing.ckpt", "threads=0"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert result.stderr.strip() == "error: threads takes an integer from 1 up, or null, got 0"
