"""`recompute=True` of the chunked mechanisms (linear, retention, gated; `recomputed` in
lam/models/attention/base.py): the outputs, states and gradients of `recompute=False`, far fewer bytes saved
for backward (counted with saved_tensors_hooks: deterministic, no timing), and generation untouched."""

from __future__ import annotations

import functools

import pytest
import torch

from decoding import context_sensitive_lam
from lam.models import generate
from lam.models.attention import GatedLinearAttention, LinearAttention, Retention, base

CASES = {  # name: (class, options)
    "linear": (LinearAttention, {"chunk_size": 8}),
    "linear-taylor": (LinearAttention, {"feature_map": "taylor", "chunk_size": 8}),
    "linear-unnormalized": (LinearAttention, {"normalize": False, "chunk_size": 8}),
    "retention": (Retention, {"chunk_size": 8}),
    "gated": (GatedLinearAttention, {"chunk_size": 4}),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, recompute: bool, dtype=torch.float64, **kwargs):
    cls, options = CASES[name]
    torch.manual_seed(0)
    return cls(d_model=32, n_head=2, rope=True, recompute=recompute, **options, **kwargs).to(dtype)


def prompt_then_continuation(layer, x: torch.Tensor, cut: int = 13):
    """The output over x, a prompt of `cut` tokens and then the rest from the prompt's state, and the grads of a
    loss on the output and the final state with respect to x and every parameter."""
    y1, state = layer(x[:, :cut])
    y2, state = layer(x[:, cut:], state)
    y = torch.cat((y1, y2), dim=1)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    loss = (y.to(x.dtype) * w).sum() + sum(s.square().sum() for s in state[:-1])
    return (y, *state[:-1], *torch.autograd.grad(loss, [x, *layer.parameters()]))


@pytest.mark.parametrize("name", CASES)
def test_recompute_gives_the_same_outputs_states_and_gradients(name, monkeypatch):
    """Float64; a continuation of 47 tokens (not a multiple of the chunk) from a 13-token prompt's state, in
    segments of 16 or 12 tokens: several checkpoints, each started from the state the previous one left."""
    monkeypatch.setattr(base, "SEGMENT", 12)
    x = torch.randn(2, 60, 32, dtype=torch.float64, requires_grad=True)
    expected = prompt_then_continuation(make(name, recompute=False), x)
    for got, want in zip(prompt_then_continuation(make(name, recompute=True), x), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "retention", "gated"])
def test_recompute_under_bf16_autocast_is_exact(name):
    """Under bf16 autocast the mechanism runs in float32; backward recomputes it as the forward ran it (one
    segment per call here, so the same ops in the same order): the very same bits as without recompute."""
    x = torch.randn(2, 60, 32, requires_grad=True)
    results = []
    for recompute in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(prompt_then_continuation(make(name, recompute, torch.float32), x))
    assert results[0][0].dtype == torch.bfloat16
    for got, want in zip(*results[::-1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("name, at_most", [("linear", 0.4), ("retention", 0.35), ("gated", 0.1)])
def test_recompute_saves_only_the_inputs_and_the_segment_states(name, at_most):
    """`mix` at T = 512 (4 heads of 64, float32, the default chunk sizes, two segments of 256): with recompute,
    autograd keeps q, k, v (and the gate logits) and the state between the segments, 3 (4) x 512 KiB plus
    65 KiB (linear's S and z) or 64 KiB. Without, it keeps the feature-mapped or scaled copies, the chunk
    scores and the per-chunk states as well: 8 x 512 KiB for linear (ratio 3/8, 0.39 with the state), 10 for
    retention (0.31); gated's (C, C, D) decays make it 21.6 MiB (0.095)."""
    cls = {"linear": LinearAttention, "retention": Retention, "gated": GatedLinearAttention}[name]
    g = torch.Generator().manual_seed(0)
    q, k, v, gates = (torch.randn(1, 4, 512, 64, generator=g).requires_grad_() for _ in range(4))
    gates = gates if cls is GatedLinearAttention else None
    saved = {}
    for recompute in (False, True):
        layer = cls(d_model=256, n_head=4, recompute=recompute)
        saved[recompute] = saved_bytes(lambda: layer.mix(q, k, v, None, gates))
    inputs = sum(t.numel() * 4 for t in (q, k, v, gates) if t is not None)
    state = 4 * 64 * (64 + 1 if cls is LinearAttention else 64) * 4  # (B, H, F, D) S, plus (B, H, F) z
    assert saved[True] == inputs + state
    assert saved[True] <= at_most * saved[False]


@pytest.mark.parametrize("name", ["linear", "retention", "gated"])
def test_generation_does_not_recompute(name, monkeypatch):
    """No checkpoint in generation (no grad: the prompt's pass and the one-token steps) nor on one token with
    grad; the same tokens as without recompute; a training forward does checkpoint."""
    cls, options = CASES[name]
    calls = []
    monkeypatch.setattr(base, "checkpoint", lambda fn, *args, **kwargs: calls.append(1) or fn(*args))
    nets = [context_sensitive_lam(functools.partial(cls, **options, recompute=r), "rope") for r in (False, True)]
    prompt = torch.randint(50, (2, 9))
    plain, recomputing = (generate(net, prompt, 12, temperature=0) for net in nets)
    nets[1](prompt[:, :1])  # one token, grad enabled
    assert torch.equal(recomputing, plain) and not calls
    nets[1](prompt)
    assert calls
