"""Linear attention: the chunked-parallel and recurrent forms against the masked quadratic form of the paper."""

import pytest
import torch

from lam.models.attention import LinearAttention
from lam.models.attention.feature_maps import elu1
from lam.models.attention.linear import chunked, recurrent


def naive(q, k, v, eps=1e-6):
    """Katharopoulos et al. 2020, eq. 6 with a causal mask: y_i = sum_{j<=i} (q_i·k_j) v_j / sum_{j<=i} q_i·k_j."""
    T = q.shape[2]
    sim = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0)
    return (sim @ v) / (sim.sum(-1, keepdim=True) + eps)


def features(B=2, H=3, T=37, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    return elu1(q), elu1(k), v


def zeros(q, v):
    B, H, _, D = q.shape
    return q.new_zeros(B, H, D, v.shape[-1]), q.new_zeros(B, H, D)


@pytest.mark.parametrize("T", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_and_recurrent_equal_naive(T, chunk):
    q, k, v = features(T=T)
    reference = naive(q, k, v)
    y_chunked, S_c, z_c = chunked(q, k, v, *zeros(q, v), chunk_size=chunk, eps=1e-6)
    y_recurrent, S_r, z_r = recurrent(q, k, v, *zeros(q, v), eps=1e-6)
    torch.testing.assert_close(y_chunked, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_recurrent, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S_c, S_r, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(z_c, z_r, atol=1e-4, rtol=1e-5)


def test_state_carries_across_calls():
    q, k, v = features(T=40)
    whole, *_ = chunked(q, k, v, *zeros(q, v), chunk_size=8, eps=1e-6)
    first, S, z = chunked(q[:, :, :23], k[:, :, :23], v[:, :, :23], *zeros(q, v), chunk_size=8, eps=1e-6)
    second, *_ = chunked(q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], S, z, chunk_size=8, eps=1e-6)
    torch.testing.assert_close(torch.cat((first, second), dim=2), whole, atol=1e-5, rtol=1e-5)


def test_module_output_at_t_ignores_later_tokens():
    torch.manual_seed(0)
    attn = LinearAttention(d_model=16, n_head=2, chunk_size=4).eval()
    x = torch.randn(1, 19, 16)
    y, _ = attn(x)
    for t in (0, 6, 13):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
        y2, _ = attn(changed)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1])
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])


def test_module_one_token_at_a_time_equals_whole_sequence():
    torch.manual_seed(0)
    attn = LinearAttention(d_model=16, n_head=2, chunk_size=4, rope=True).eval()
    x = torch.randn(2, 11, 16)
    whole, _ = attn(x)
    state, steps = None, []
    for t in range(11):
        y, state = attn(x[:, t : t + 1], state)
        steps.append(y)
    assert state.offset == 11
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)
