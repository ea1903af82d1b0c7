"""The decoder and baselines: causality, cached logits = recomputed logits at every step, cached generation =
uncached generation, plain-PyTorch use."""

import functools
import subprocess
import sys

import pytest
import torch

from decoding import assert_cached_logits_match, context_sensitive_lam
from lam.models import LAM, Bigram, NGram, generate
from lam.models.attention import LinearAttention, SoftmaxAttention

ATTENTIONS = {"softmax": SoftmaxAttention, "linear": functools.partial(LinearAttention, chunk_size=8)}


def tiny_lam(attention, pos="learned", block_size=24):
    torch.manual_seed(0)
    return LAM(vocab_size=50, attention=ATTENTIONS[attention], n_layer=2, n_head=2, n_embd=32,
               block_size=block_size, pos=pos).eval()


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_logits_at_t_ignore_later_tokens(attention, pos):
    net = tiny_lam(attention, pos)
    idx = torch.randint(50, (2, 20))
    logits, _ = net(idx)
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    logits2, _ = net(changed)
    torch.testing.assert_close(logits2[:, :12], logits[:, :12])
    assert not torch.allclose(logits2[:, 12:], logits[:, 12:])


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
