"""LoRA adapters (lam.models.lora): exact at the start, only adapters train, merging changes nothing."""

import copy
import functools

import pytest
import torch

from lam.models import LAM
from lam.models.attention import LinearAttention, SoftmaxAttention
from lam.models.lora import LoRALinear, add_lora, merge_lora, merge_lora_weights
from lam.training.lightning_module import param_groups

VOCAB = 11


def base_model(attention=SoftmaxAttention, **kwargs) -> LAM:
    torch.manual_seed(0)
    return LAM(VOCAB, attention=attention, n_layer=2, n_head=2, n_embd=16, block_size=12, **kwargs)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))


def train_step(net: LAM) -> None:
    """One AdamW step with weight decay on the model's parameter groups, as lam.train builds them."""
    optimizer = torch.optim.AdamW(param_groups(net), lr=1e-2, weight_decay=0.1)
    logits, _ = net(tokens())
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens(2).flatten()).backward()
    optimizer.step()


@pytest.mark.parametrize("attention", [SoftmaxAttention, functools.partial(LinearAttention, chunk_size=4)],
                         ids=["softmax", "linear"])
def test_at_init_the_adapted_model_computes_exactly_the_base_model(attention):
    base = base_model(attention)
    adapted = copy.deepcopy(base)
    assert len(add_lora(adapted, r=4)) == 2 * 4  # qkv, attn.proj, mlp.fc, mlp.proj in each of 2 blocks
    assert torch.equal(adapted(tokens())[0], base(tokens())[0])


def test_base_weights_keep_their_names_and_a_base_state_dict_loads():
    base = base_model()
    adapted = base_model()
    add_lora(adapted, r=4)
    missing, unexpected = adapted.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.rpartition(".")[2].startswith("lora_") for k in missing)
    for name, tensor in base.state_dict().items():
        assert torch.equal(adapted.state_dict()[name], tensor), name


def test_a_training_step_changes_only_the_adapters():
    net = base_model()
    add_lora(net, r=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_step(net)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.endswith((".lora_A", ".lora_B"))}


def test_biases_and_norms_train_by_choice():
    net = base_model(bias=True)
    add_lora(net, targets=["qkv"], r=2, train_biases=True, train_norms=True)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert "blocks.0.mlp.fc.bias" in trainable and "blocks.1.ln_2.weight" in trainable and "ln_f.bias" in trainable
    assert "blocks.0.mlp.fc.weight" not in trainable and "wte.weight" not in trainable
    assert "blocks.0.mlp.fc.lora_A" not in trainable and "blocks.0.attn.qkv.lora_A" in trainable


def trained_adapters(r: int = 4) -> LAM:
    """An adapted model whose B matrices are no longer zero."""
    net = base_model()
    add_lora(net, r=r, alpha=8)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.1)
    return net.eval()


def test_merged_model_computes_what_the_adapted_one_did_with_plain_linear_layers():
    net = trained_adapters()
    expected = net(tokens())[0]
    assert not torch.allclose(expected, base_model()(tokens())[0], atol=1e-3)  # the adapters do change it
    merged = merge_lora(net)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(tokens())[0], expected, atol=1e-5, rtol=0)


def test_merged_state_dict_loads_into_a_plain_model_and_computes_the_same():
    net = trained_adapters()
    plain = base_model()
    plain.load_state_dict(merge_lora_weights(net.state_dict()))  # strict: exactly the plain model's keys
    torch.testing.assert_close(plain(tokens())[0], net(tokens())[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": ["qkv", "wq"]}, "['wq'] name no linear layer"),
    ({"targets": ["lm_head"]}, "share their weight"),
    ({"r": 0}, "at least 1"),
])
def test_impossible_adapters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        add_lora(base_model(), **kwargs)
