"""Muon (lam.training.optimizers): the batched update against torch.optim.Muon and a per-matrix reference, and
MuonAdamW as one optimizer for Lightning, the lr schedule and checkpoints."""

import copy

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from helpers import TINY, column, compose_train, read_metrics
from lam.train import train
from lam.training.lightning_module import param_groups
from lam.training.optimizers import Muon, MuonAdamW, orthogonalize

SHAPES = [(24, 8), (24, 8), (8, 32), (8, 8), (8, 32)]  # tall, wide and square, two of a shape at least


def matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("shape", [(24, 8), (8, 24), (16, 16)])
def test_orthogonalize_pushes_every_singular_value_near_one(shape):
    """Seeded: a square Gaussian matrix's smallest singular value can be near 0, which five iterations do not
    lift to 0.6 (an unseeded draw of 16 x 16 gave 0.59)."""
    scales = torch.tensor([1e-3, 1.0, 50.0], dtype=torch.float64)[:, None, None]
    G = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * scales
    s = torch.linalg.svdvals(orthogonalize(G))
    assert s.min() > 0.6 and s.max() < 1.25  # Jordan et al.'s quintic leaves them in about [0.7, 1.2]
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 10  # the input was far from it


def test_orthogonalize_in_a_batch_equals_one_matrix_at_a_time():
    G = torch.randn(4, 24, 8, dtype=torch.float64)
    assert torch.allclose(orthogonalize(G), torch.stack([orthogonalize(g) for g in G]), atol=1e-12)


@pytest.mark.parametrize("nesterov, weight_decay, adjust", [(True, 0.0, None), (False, 0.1, "match_rms_adamw")])
def test_batched_muon_takes_torch_muons_steps(nesterov, weight_decay, adjust):
    """Both run Newton-Schulz in bfloat16 (torch's choice), batched or not, so they agree to bf16's rounding,
    which five iterations amplify: measured 2-4% of how far the weights moved in 3 steps; a step without
    Nesterov or without the weight decay is off by 20% to 100%."""
    ours, theirs = matrices(), matrices()
    kw = {"lr": 0.02, "momentum": 0.9, "nesterov": nesterov, "weight_decay": weight_decay, "adjust_lr_fn": adjust}
    a, b = Muon(ours, ns_dtype="bfloat16", **kw), torch.optim.Muon(theirs, **kw)
    start = [p.detach().clone() for p in ours]
    for step in range(3):
        set_grads(ours, step), set_grads(theirs, step)
        a.step(), b.step()
    for p, q, p0 in zip(ours, theirs, start):
        moved = (q - p0).abs().max()
        assert moved > 0.02 and (p - q).abs().max() < 0.1 * moved
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_batched_muon_in_float32_equals_a_per_matrix_loop():
    """The reference: torch.optim.Muon's update written out per matrix, Newton-Schulz in float32."""
    ours, ref = matrices(), matrices()
    opt = Muon(ours, lr=0.05, weight_decay=0.1, ns_dtype="float32")
    bufs = [torch.zeros_like(p) for p in ref]
    for step in range(3):
        set_grads(ours, step), set_grads(ref, step)
        opt.step()
        with torch.no_grad():
            for p, buf in zip(ref, bufs):
                buf.mul_(0.95).add_(p.grad, alpha=0.05)
                update = orthogonalize(p.grad + 0.95 * (buf - p.grad))
                p.mul_(1 - 0.05 * 0.1).sub_(update, alpha=0.05 * max(1, p.shape[0] / p.shape[1]) ** 0.5)
    for p, q in zip(ours, ref):
        assert torch.allclose(p, q, atol=1e-6)


def tiny_net():
    from lam.models import LAM
    torch.manual_seed(0)
    return LAM(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=8)


def test_muon_adamw_is_one_optimizer_for_the_schedule_and_the_checkpoint():
    net = tiny_net()
    opt = MuonAdamW(param_groups(net), lr=1e-2, muon_lr=0.05, ns_dtype="float32")
    muon_params = set(map(id, opt.muon.param_groups[0]["params"]))
    assert all(p.dim() == 2 for p in opt.muon.param_groups[0]["params"])
    assert id(net.wte.weight) not in muon_params and len(opt.adamw.param_groups) == 1  # embedding+norms: AdamW
    schedule = LambdaLR(opt, lambda step: 0.0)  # a zero lr reaches both inner optimizers
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randint(11, (2, 8)))[0].sum().backward()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    schedule.step()

    def take_steps(net, opt, steps):
        for i in range(steps):
            opt.zero_grad()
            net(torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(i)))[0].square().mean().backward()
            opt.step()

    for group in opt.param_groups:
        group["lr"] = group["initial_lr"]
    take_steps(net, opt, 2)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict()))  # the live state goes on changing
    take_steps(net, opt, 2)
    twin = tiny_net()
    twin.load_state_dict(saved[0])
    twin_opt = MuonAdamW(param_groups(twin), lr=1e-2, muon_lr=0.05, ns_dtype="float32")
    twin_opt.load_state_dict(saved[1])
    assert twin_opt.muon.state is twin_opt.state and twin_opt.muon.param_groups[0] is twin_opt.param_groups[0]
    take_steps(twin, twin_opt, 2)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_optim_muon_trains_and_resumes_through_lam_train(tmp_path, corpus):
    def run(name, *overrides):
        out = tmp_path / name
        cfg = compose_train([*TINY, "data=custom", f"data.path={corpus}", "optim=muon", "optim.ns_dtype=float32",
                             "trainer.precision=32-true", "trainer.max_steps=16", *overrides], out)
        train(cfg)
        return column(read_metrics(out), "train/loss"), out

    whole, _ = run("whole")
    assert whole[-1][1] < whole[0][1] - 0.3
    first, out = run("first", "+callbacks.stop._target_=helpers.StopAt", "+callbacks.stop.step=8")
    resumed, _ = run("second", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}")
    assert [s for s, _ in resumed] == [s for s, _ in whole[8:]]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in whole[8:]], abs=1e-6)
