"""The decoder and baselines: causality, cached logits = recomputed logits at every step, cached generation =
uncached generation, plain-PyTorch use; the options QK-norm, relu² and an untied head, and the optimizer groups
an untied head gets."""

import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from decoding import assert_cached_logits_match, context_sensitive_lam
from lam.models import LAM, Bigram, NGram, generate
from lam.models.attention import (
    GatedLinearAttention,
    LinearAttention,
    Retention,
    SlidingWindowAttention,
    SoftmaxAttention,
)
from lam.models.flops import forward_flops_per_token
from lam.training.lightning_module import param_groups
from lam.training.optimizers import MuonAdamW

ATTENTIONS = {"softmax": SoftmaxAttention, "linear": functools.partial(LinearAttention, chunk_size=8)}
MECHANISMS = {**ATTENTIONS, "window": functools.partial(SlidingWindowAttention, window=5),
              "retention": functools.partial(Retention, chunk_size=8),
              "gated": functools.partial(GatedLinearAttention, chunk_size=8)}  # every one, small windows and chunks


def tiny_lam(attention, pos="learned", block_size=24, **options):
    torch.manual_seed(0)
    return LAM(vocab_size=50, attention=MECHANISMS[attention], n_layer=2, n_head=2, n_embd=32,
               block_size=block_size, pos=pos, **options).eval()


def assert_logits_at_t_ignore_later_tokens(net, t: int = 12):
    idx = torch.randint(50, (2, 20))
    logits, _ = net(idx)
    changed = idx.clone()
    changed[:, t:] = (changed[:, t:] + 1) % 50
    logits2, _ = net(changed)
    torch.testing.assert_close(logits2[:, :t], logits[:, :t])
    assert not torch.allclose(logits2[:, t:], logits[:, t:])


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_logits_at_t_ignore_later_tokens(attention, pos):
    assert_logits_at_t_ignore_later_tokens(tiny_lam(attention, pos))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_cached_logits_equal_recomputed_at_every_step(attention, pos):
    assert_cached_logits_match(context_sensitive_lam(ATTENTIONS[attention], pos))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_cached_generation_equals_uncached(attention, pos):
    net = context_sensitive_lam(ATTENTIONS[attention], pos, block_size=24)
    prompt = torch.randint(50, (2, 5))
    # 40 new tokens run past block_size=24, where learned positions crop the context
    cached = generate(net, prompt, 40, temperature=0, use_cache=True)
    uncached = generate(net, prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, 45) and len(set(cached[:, 5:].flatten().tolist())) > 5  # not one token repeated
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_state_continues_a_sequence(attention):
    net = tiny_lam(attention, "rope")
    idx = torch.randint(50, (1, 20))
    whole, _ = net(idx)
    first, state = net(idx[:, :9])
    second, _ = net(idx[:, 9:], state)
    torch.testing.assert_close(torch.cat((first, second), dim=1), whole, atol=1e-5, rtol=1e-4)


def test_sampling_is_seeded():
    net = tiny_lam("linear")
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = [generate(net, prompt, 30, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(s))
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_longer_than_block_size_is_refused():
    net = tiny_lam("softmax", block_size=8)
    with pytest.raises(ValueError, match="longer than block_size=8"):
        net(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("model", [Bigram(50), NGram(50, n=3, n_embd=8, hidden=16)])
def test_baselines_cached_generation_equals_uncached(model):
    torch.manual_seed(0)
    model.eval()
    prompt = torch.randint(50, (2, 4))
    assert torch.equal(generate(model, prompt, 15, temperature=0),
                       generate(model, prompt, 15, temperature=0, use_cache=False))


def test_ngram_sees_only_its_window():
    torch.manual_seed(0)
    model = NGram(50, n=3, n_embd=8, hidden=16).eval()
    idx = torch.randint(50, (1, 10))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, :5] = (changed[:, :5] + 1) % 50  # positions >= 6 see only tokens t-1, t
    logits2, _ = model(changed)
    torch.testing.assert_close(logits2[:, 6:], logits[:, 6:])


def test_gpt2_init_and_weight_tying():
    net = LAM(vocab_size=50, n_layer=8, n_embd=64, n_head=4)
    assert net.lm_head.weight is net.wte.weight
    proj = net.blocks[0].attn.proj.weight
    assert abs(proj.std().item() - 0.02 / (2 * 8) ** 0.5) < 0.002
    assert abs(net.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002


def test_models_import_no_lightning_or_hydra():
    code = ("import sys, torch, lam.models as m; net = m.LAM(vocab_size=10); net(torch.zeros(1, 3, dtype=torch.long));"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'lightning', 'hydra', 'pytorch_lightning'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------- the options: qk_norm, relu2, tie_head
@pytest.mark.parametrize("attention", MECHANISMS)
def test_qk_norm_gives_each_head_unit_rms_queries_and_keys(attention):
    x = torch.randn(2, 9, 32)
    q, k, v = tiny_lam(attention, "rope", qk_norm=True).blocks[1].attn.project(x)  # normalised, then rotated
    plain_q, _, plain_v = tiny_lam(attention, "rope").blocks[1].attn.project(x)  # the same weights (seed 0)
    for t in (q, k):
        rms = t.square().mean(-1).sqrt()  # (B, H, T): each head at each token; 1 up to rms_norm's eps
        torch.testing.assert_close(rms, torch.ones(2, 2, 9), atol=1e-4, rtol=0)
    assert not torch.allclose(plain_q.square().mean(-1), torch.ones(2, 2, 9), atol=0.5)
    torch.testing.assert_close(v, plain_v)  # values are left alone


@pytest.mark.parametrize("attention", MECHANISMS)
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_qk_norm_keeps_logits_at_t_blind_to_later_tokens(attention, pos):
    assert_logits_at_t_ignore_later_tokens(tiny_lam(attention, pos, qk_norm=True))


@pytest.mark.parametrize("attention", MECHANISMS)
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_qk_norm_cached_logits_equal_recomputed_at_every_step(attention, pos):
    assert_cached_logits_match(context_sensitive_lam(MECHANISMS[attention], pos, qk_norm=True))


def test_relu2_is_the_square_of_relu():
    mlp = tiny_lam("softmax", activation="relu2").blocks[0].mlp
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.proj(F.relu(mlp.fc(x)) ** 2))


def test_an_untied_head_has_a_weight_of_its_own_and_both_train():
    net, tied = tiny_lam("softmax", tie_head=False).train(), tiny_lam("softmax")
    head, embedding = net.lm_head.weight, net.wte.weight
    assert head is not embedding and head.data_ptr() != embedding.data_ptr()
    assert abs(head.std().item() - 0.02) < 0.002  # initialised as the other linear layers
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in tied.parameters()) + head.numel()
    assert forward_flops_per_token(net, 8) == forward_flops_per_token(tied, 8)  # the head's product, once
    idx = torch.randint(50, (2, 20))
    F.cross_entropy(net(idx[:, :-1])[0].flatten(0, 1), idx[:, 1:].flatten()).backward()
    assert head.grad.abs().sum() > 0 and embedding.grad.abs().sum() > 0
    before = head.detach().clone(), embedding.detach().clone()
    torch.optim.AdamW(param_groups(net), lr=1e-2).step()
    assert not torch.equal(head, before[0]) and not torch.equal(embedding, before[1])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_untied_head_is_decayed_by_adamw_not_muon(optimizer):
    """[hidden matrices, head, the rest]: under optim=muon the head goes to AdamW, which decays it with the
    optimizer's weight_decay, as plain AdamW does; the embedding is not decayed."""
    net = tiny_lam("softmax", tie_head=False)
    head, embedding = net.lm_head.weight, net.wte.weight
    groups = param_groups(net)
    assert len(groups) == 3 and len(groups[1]["params"]) == 1 and groups[1]["params"][0] is head
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.5)
    else:
        opt = MuonAdamW(groups, lr=0.1, muon_lr=0.02, weight_decay=0.5, ns_dtype="float32")
        assert all(p is not head for p in opt.muon.param_groups[0]["params"])
    before = head.detach().clone(), embedding.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # a step of decay alone
    opt.step()
    torch.testing.assert_close(head, before[0] * (1 - 0.1 * 0.5))  # AdamW's lr times the weight decay
    assert torch.equal(embedding, before[1])


def test_a_tied_or_frozen_head_has_no_group_of_its_own():
    net = tiny_lam("softmax")
    decay, other = param_groups(net)
    linears = [m.weight for m in net.modules() if isinstance(m, torch.nn.Linear) and m is not net.lm_head]
    assert list(map(id, decay["params"])) == list(map(id, linears)) and "weight_decay" not in decay
    assert other["weight_decay"] == 0.0 and any(p is net.wte.weight for p in other["params"])
    assert len(decay["params"]) + len(other["params"]) == len(list(net.parameters()))
    frozen = tiny_lam("softmax", tie_head=False)
    frozen.lm_head.weight.requires_grad_(False)  # as LoRA leaves it
    assert len(param_groups(frozen)) == 2 and all(p is not frozen.lm_head.weight
                                                  for g in param_groups(frozen) for p in g["params"])
