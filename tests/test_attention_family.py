"""The attention family against naive references written here from each paper's formula (masked quadratic forms).

For every mechanism: parallel/chunked form = recurrent/cached form = reference (fp32, 1e-5), at lengths that are
and are not multiples of the chunk size; causality; state carried across two halves = one pass; the logits of
decoding with state = those of recomputing the context at every step (float64), and greedy generation too;
gradients (gradcheck in float64, and against the reference); no NaN for inputs x100 or long sequences; every
conf/attention/*.yaml builds a LAM that learns.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from decoding import assert_cached_logits_match, context_sensitive_lam
from lam.models import LAM, generate
from lam.models.attention import (
    GatedLinearAttention,
    KVCache,
    LinearAttention,
    Retention,
    SlidingWindowAttention,
    SoftmaxAttention,
)
from lam.models.attention.feature_maps import FEATURE_MAPS

CONF = Path(__file__).resolve().parents[1] / "conf" / "attention"
CHUNK = 8
CASES = {  # name: (class, options); chunked mechanisms use CHUNK
    "softmax": (SoftmaxAttention, {}),
    "window": (SlidingWindowAttention, {"window": 5}),
    "linear": (LinearAttention, {"chunk_size": CHUNK}),
    "linear-relu": (LinearAttention, {"feature_map": "relu", "chunk_size": CHUNK}),
    "linear-taylor": (LinearAttention, {"feature_map": "taylor", "chunk_size": CHUNK}),
    "linear-unnormalized": (LinearAttention, {"normalize": False, "chunk_size": CHUNK}),
    "linear-identity": (LinearAttention, {"feature_map": "identity", "normalize": False,
                                          "chunk_size": CHUNK}),
    "retention": (Retention, {"chunk_size": CHUNK}),
    "gated": (GatedLinearAttention, {"chunk_size": CHUNK}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is 40x faster on a busy CPU


def make(name: str, d_model: int = 32, n_head: int = 2, **kwargs):
    cls, options = CASES[name]
    return cls(d_model=d_model, n_head=n_head, **{**options, **kwargs})


# ----------------------------------------------------------------------------------------- naive references
def rms(y, eps=1e-5):
    return y / torch.sqrt(y.pow(2).mean(dim=-1, keepdim=True) + eps)


def causal_mask(T, window=None):
    dist = torch.arange(T)[:, None] - torch.arange(T)
    return (dist >= 0) & (dist < (window or T))


def reference(layer, q, k, v, gates=None):
    """The paper's formula as one masked (T, T) product, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    T, d = q.shape[2], q.shape[3]
    if isinstance(layer, (SoftmaxAttention, SlidingWindowAttention)):  # Vaswani et al. 2017, eq. 1, banded
        mask = causal_mask(T, getattr(layer, "window", None))
        return (q @ k.mT / math.sqrt(d)).masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
    if isinstance(layer, LinearAttention):  # Katharopoulos et al. 2020, eq. 4-6
        A = (layer.phi(q) @ layer.phi(k).mT) * causal_mask(T)
        return A @ v / (A.sum(dim=-1, keepdim=True) + layer.eps) if layer.normalize else rms(A @ v)
    if isinstance(layer, Retention):  # Sun et al. 2023, eq. 5: (Q Kᵀ ⊙ D) V, D_nm = gamma^(n-m)
        gamma = 1 - 2.0 ** (-5.0 - torch.arange(q.shape[1], dtype=torch.float64))
        n = torch.arange(T, dtype=torch.float64)
        D = gamma[:, None, None] ** (n[:, None] - n).clamp(min=0) * causal_mask(T)
        return rms((q @ k.mT / math.sqrt(d)) * D @ v)
    if isinstance(layer, GatedLinearAttention):  # Yang et al. 2023, Sec. 4.2: ((Q ⊙ B)(K / B)ᵀ ⊙ M) V
        alpha = torch.sigmoid(gates.double()) ** (1 / layer.gate_temperature)
        Bc = alpha.cumprod(dim=2)  # b_t = prod_{s<=t} alpha_s
        return rms(((q * Bc) @ (k / Bc).mT / math.sqrt(d)) * causal_mask(T) @ v)
    raise TypeError(type(layer))


def inputs(layer, B=2, T=37, scale=1.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, layer.n_head, T, layer.head_dim)
    q, k, v = (scale * torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
    gated = isinstance(layer, GatedLinearAttention)
    extra = {"gates": torch.randn(shape, generator=g, dtype=dtype)} if gated else {}
    return q, k, v, extra


def step_by_step(layer, q, k, v, extra):
    """The recurrent / cached form: one token at a time, carrying the state."""
    ys, state = [], None
    for t in range(q.shape[2]):
        sl = slice(t, t + 1)
        y, state = layer.mix(q[:, :, sl], k[:, :, sl], v[:, :, sl], state,
                             **{n: e[:, :, sl] for n, e in extra.items()})
        ys.append(y)
    return torch.cat(ys, dim=2), state


def contents(state) -> tuple:
    """The tensors a state holds: a KV cache's keys and values seen (not its room), a recurrent state's own."""
    return state.keys_values() if isinstance(state, KVCache) else tuple(state[:-1])


# --------------------------------------------------------------------------------------------------- forms
@pytest.mark.parametrize("T", [4 * CHUNK, 4 * CHUNK + 5, 3])
@pytest.mark.parametrize("name", CASES)
def test_parallel_and_recurrent_forms_equal_the_reference(name, T):
    torch.manual_seed(0)
    layer = make(name)
    q, k, v, extra = inputs(layer, T=T)
    y_parallel, state_parallel = layer.mix(q, k, v, None, **extra)
    y_recurrent, state_recurrent = step_by_step(layer, q, k, v, extra)
    y_ref = reference(layer, q, k, v, **extra)
    torch.testing.assert_close(y_parallel.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_recurrent.double(), y_ref, atol=1e-5, rtol=1e-5)
    assert state_parallel.offset == state_recurrent.offset == T
    for a, b in zip(contents(state_parallel), contents(state_recurrent)):  # same state (KV cache, S, z) either way
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


CHUNKED = [name for name, (_, options) in CASES.items() if "chunk_size" in options]


@pytest.mark.parametrize("T", [1, 5, 16, 37])
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("name", CHUNKED)
def test_any_chunk_size_gives_the_reference(name, chunk, T):
    """Chunks of one token, chunks longer than the sequence, and a last chunk cut short."""
    layer = make(name, chunk_size=chunk)
    q, k, v, extra = inputs(layer, T=T)
    y, state = layer.mix(q, k, v, None, **extra)
    torch.testing.assert_close(y.double(), reference(layer, q, k, v, **extra), atol=1e-5, rtol=1e-5)
    assert state.offset == T


@pytest.mark.parametrize("name", CASES)
def test_causal(name):
    torch.manual_seed(0)
    layer = make(name, rope=True)
    x = torch.randn(2, 29, 32)
    t0 = 13  # not on a chunk boundary
    x2 = x.clone()
    x2[:, t0:] += torch.randn_like(x2[:, t0:])
    y, _ = layer(x)
    y2, _ = layer(x2)
    torch.testing.assert_close(y2[:, :t0], y[:, :t0], atol=1e-6, rtol=0)
    assert not torch.allclose(y2[:, t0:], y[:, t0:], atol=1e-3)


def test_window_forgets_tokens_outside_the_window():
    torch.manual_seed(0)
    layer = make("window")
    x = torch.randn(1, 20, 32)
    x2 = x.clone()
    x2[:, :6] += 1.0  # tokens 0..5 are out of reach of queries 10.. (window 5: keys t-4 .. t)
    y, y2 = layer(x)[0], layer(x2)[0]
    torch.testing.assert_close(y2[:, 10:], y[:, 10:], atol=1e-6, rtol=0)
    assert not torch.allclose(y2[:, 6:10], y[:, 6:10], atol=1e-3)


@pytest.mark.parametrize("name", CASES)
def test_state_carried_across_halves_equals_one_pass(name):
    torch.manual_seed(0)
    layer = make(name, rope=True)  # rotary positions must continue at the state's offset
    x = torch.randn(2, 37, 32)
    y, state = layer(x)
    y1, s1 = layer(x[:, :13])
    y2, s2 = layer(x[:, 13:], s1)
    torch.testing.assert_close(torch.cat((y1, y2), dim=1), y, atol=1e-5, rtol=1e-5)
    assert s2.offset == state.offset == 37
    for a, b in zip(contents(s2), contents(state)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_window_cache_is_trimmed_and_offset_keeps_counting():
    layer = make("window")
    _, state = layer(torch.randn(1, 30, 32))
    _, state = layer(torch.randn(1, 1, 32), state)
    assert state.k.shape[2] == state.v.shape[2] == 4 and state.offset == 31


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("name", CASES)
def test_decoding_with_state_equals_recomputing(name, pos):
    """The logits at every step (float64), then greedy generation, on a decoder whose outputs depend on the
    context."""
    cls, options = CASES[name]
    net = context_sensitive_lam(functools.partial(cls, **options), pos)
    assert_cached_logits_match(net)
    prompt = torch.randint(50, (2, 5))
    cached = generate(net, prompt, 20, temperature=0, use_cache=True)
    recomputed = generate(net, prompt, 20, temperature=0, use_cache=False)
    assert len(set(cached[:, 5:].flatten().tolist())) > 5 and torch.equal(cached, recomputed)


# ----------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", CASES)
def test_gradients(name):
    torch.manual_seed(0)
    layer = make(name, d_model=8, n_head=2, **({"chunk_size": 4} if "chunk_size" in CASES[name][1] else {}))
    layer = layer.double()
    q, k, v, extra = inputs(layer, B=1, T=6, dtype=torch.float64)
    tensors = (q, k, v, *extra.values())
    for t in tensors:
        t.requires_grad_(True)

    def parallel(q, k, v, *gate):
        return layer.mix(q, k, v, None, **dict(zip(extra, gate)))[0]

    assert torch.autograd.gradcheck(parallel, tensors)
    w = torch.randn_like(v)
    grads = torch.autograd.grad((parallel(*tensors) * w).sum(), tensors)
    y_ref = reference(layer, *tensors[:3], **dict(zip(extra, tensors[3:])))
    grads_ref = torch.autograd.grad((y_ref * w).sum(), tensors)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-6)


# -------------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", CASES)
def test_no_nan_for_large_inputs_and_long_sequences(name):
    torch.manual_seed(0)
    layer = make(name)
    for T, scale in ((45, 100.0), (3000, 1.0), (700, 100.0)):
        x = (scale * torch.randn(1, T, 32)).requires_grad_(True)
        y, state = layer(x)
        y.square().mean().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), (T, scale)
        assert all(torch.isfinite(s).all() for s in contents(state))


@pytest.mark.parametrize("name", ["linear", "linear-taylor", "retention", "gated"])
def test_bf16_autocast_accumulates_in_float32(name):
    torch.manual_seed(0)
    layer = make(name)
    x = torch.randn(1, 40, 32)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, state = layer(x)
    assert state.S.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.05)


def test_taylor_feature_map_is_the_second_order_expansion():
    q, k = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    phi = FEATURE_MAPS["taylor"]
    s = (q * k).sum(dim=-1) / 16 ** 0.5
    torch.testing.assert_close((phi(q) * phi(k)).sum(dim=-1), 1 + s + s ** 2 / 2)
    assert phi(q).shape[-1] == 1 + 16 + 16 * 17 // 2


def test_options_are_validated():
    with pytest.raises(ValueError, match="normalize=False"):
        LinearAttention(32, 2, feature_map="identity")
    with pytest.raises(ValueError, match="unknown feature_map"):
        LinearAttention(32, 2, feature_map="cosine")
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(32, 2, window=0)
    with pytest.raises(ValueError, match="backend"):
        Retention(32, 2, backend="cuda")


FLA_READY = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None


@pytest.mark.skipif(FLA_READY, reason="fla and CUDA are available")
@pytest.mark.parametrize("cls", [LinearAttention, Retention, GatedLinearAttention])
def test_fla_backend_fails_clearly_without_cuda_or_fla(cls):
    with pytest.raises((ImportError, RuntimeError), match="fla"):
        cls(32, 2, backend="fla")


@pytest.mark.skipif(not FLA_READY, reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("name", ["linear", "linear-unnormalized", "retention", "gated"])
def test_fla_backend_matches_torch(name):
    torch.manual_seed(0)
    layer = make(name, d_model=128, n_head=2).cuda()
    fla_layer = make(name, d_model=128, n_head=2, backend="fla").cuda()
    fla_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 100, 128, device="cuda")
    y, state = layer(x[:, :60])
    y_fla, state_fla = fla_layer(x[:, :60])
    torch.testing.assert_close(y_fla, y, atol=2e-3, rtol=2e-3)
    y2, y2_fla = layer(x[:, 60:], state)[0], fla_layer(x[:, 60:], state_fla)[0]
    torch.testing.assert_close(y2_fla, y2, atol=2e-3, rtol=2e-3)


def fla_contract(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, normalize=None,
                 head_first=False):
    """fla's documented semantics, one token at a time: S_t = exp(g_t) S_(t-1) + k_t v_tᵀ, o_t = scale q_t S_t,
    with q, k, v (B, T, H, D) ((B, H, T, D) if head_first), g (B, T, H) or (B, T, H, K) log decays, S (B, H, K, V);
    normalize (chunk_linear_attn only) divides o_t by scale q_t · sum of k up to t, plus 1e-5."""
    if head_first:
        q, k, v, g = (None if t is None else t.transpose(1, 2) for t in (q, k, v, g))
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        if g is not None:
            decay = g[:, t].exp()
            S = S * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, None, :] @ S).squeeze(-2))
    o = torch.stack(outs, dim=1)
    if normalize:
        o = o / ((scale * q * k.cumsum(dim=1)).sum(dim=-1, keepdim=True) + 1e-5)
    if head_first:
        o = o.transpose(1, 2)
    return o, (S if output_final_state else None)


@pytest.fixture
def fla_stand_in(monkeypatch):
    """A `fla` package whose three ops follow fla's documented contract, computed by `fla_contract` on CPU.
    chunk_linear_attn keeps the (B, H, T, D) default of older releases, so the wiring must ask for head_first=False."""
    import importlib.machinery
    import sys
    import types

    def linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                    head_first=True):
        return fla_contract(q, k, v, None, scale, initial_state, output_final_state, normalize, head_first)

    def gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
        assert g.dim() == 4, "chunk_gla takes per-channel gates (B, T, H, K)"
        return fla_contract(q, k, v, g, scale, initial_state, output_final_state)

    def simple_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
        assert g.dim() == 3, "chunk_simple_gla takes per-head gates (B, T, H)"
        return fla_contract(q, k, v, g, scale, initial_state, output_final_state)

    ops = {"linear_attn": ("chunk_linear_attn", linear_attn), "gla": ("chunk_gla", gla),
           "simple_gla": ("chunk_simple_gla", simple_gla)}
    for name, attrs in [("fla", {}), ("fla.ops", {}),
                        *((f"fla.ops.{m}", {fn_name: fn}) for m, (fn_name, fn) in ops.items())]:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("lam.models.attention.fla_backend.KERNEL_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("name", ["linear", "linear-unnormalized", "linear-relu", "retention", "gated"])
def test_fla_wiring_matches_torch_under_flas_contract(fla_stand_in, name):
    """What backend='fla' hands fla (layout, scale, gates, state, normalize) and how it reads the result back,
    checked on CPU against a stand-in that follows fla's documented contract: same outputs, carried state and
    gradients as the torch path, also for a prompt continued in a second call and one recurrent token."""
    torch.manual_seed(0)
    layer, fla_layer = make(name), make(name, backend="fla")
    fla_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 21, 32, requires_grad=True)
    (y, state), (y_fla, state_fla) = layer(x[:, :13]), fla_layer(x[:, :13])
    torch.testing.assert_close(y_fla, y, atol=1e-5, rtol=1e-5)
    for part in (slice(13, 20), slice(20, 21)):
        (y, state), (y_fla, state_fla) = layer(x[:, part], state), fla_layer(x[:, part], state_fla)
        torch.testing.assert_close(y_fla, y, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(m(x)[0].square().sum(), [x, *m.parameters()]) for m in (layer, fla_layer)]
    for g, g_fla in zip(*grads):
        torch.testing.assert_close(g_fla, g, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- configs
YAMLS = sorted(CONF.glob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_yaml_builds_a_lam_that_learns(path):
    torch.manual_seed(0)
    factory = hydra.utils.instantiate(OmegaConf.load(path))
    net = LAM(vocab_size=32, attention=factory, n_layer=1, n_head=2, n_embd=32, block_size=48)
    idx = torch.randint(32, (4, 48))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits, _ = net(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_yaml_documents_every_key(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", " ", "_target_", "_partial_")):
            assert i > 0 and lines[i - 1].startswith("#"), f"{path.name}: {line!r} has no comment above it"


@torch.no_grad()
def test_two_continuations_of_one_kv_cache_keep_their_own_keys():
    """The KV cache appends into room that caches continuing one another share; a second continuation of the
    same cache copies before it writes, so the first one's next step still sees its own token."""
    net = context_sensitive_lam(SoftmaxAttention, "learned")
    idx = torch.randint(50, (1, 9), generator=torch.Generator().manual_seed(3))
    _, state = net(idx[:, :5])
    _, state = net(idx[:, 5:6], state)  # a cache with room after its 6 tokens
    _, first = net(idx[:, 6:7], state)  # writes position 6 into the room
    second, _ = net(idx[:, 7:8], state)  # another token at position 6
    after_first, _ = net(idx[:, 8:9], first)

    def recomputed(*pieces):
        return net(torch.cat(pieces, dim=1))[0][:, -1]

    torch.testing.assert_close(second[:, -1], recomputed(idx[:, :6], idx[:, 7:8]), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(after_first[:, -1], recomputed(idx[:, :7], idx[:, 8:9]), rtol=1e-7, atol=1e-7)
    assert first[0].k.shape[2] > first[0].length  # the room is there: appending does not copy the cache
