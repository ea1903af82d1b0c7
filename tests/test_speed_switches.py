"""The speed switches change how fast training runs, never what it computes: bf16 autocast, torch.compile,
fused AdamW, the thread count, and the Throughput callback that measures them. Tiny models, one thread."""

import functools
import json
import logging
import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from helpers import TINY, column, compose_train, read_metrics
from lam.config import user_error
from lam.training import precision as hardware
from lam.models import LAM
from lam.models.attention import LinearAttention, SoftmaxAttention
from lam.errors import UserError
from lam.train import check_values, train
from precisions import curves_agree

BATCH, BLOCK, STEPS, WINDOW = 4, 32, 20, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(attention=SoftmaxAttention, seed: int = 0) -> LAM:
    torch.manual_seed(seed)
    return LAM(vocab_size=17, attention=attention, n_layer=1, n_head=2, n_embd=16, block_size=16)


def train_losses(steps: int, autocast: bool = False, fused: bool | None = None) -> list[float]:
    """Per-step losses of a tiny model on fixed batches, optionally under CPU bf16 autocast."""
    net = tiny_net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=fused)
    starts = torch.randint(17, (steps, 4, 1), generator=torch.Generator().manual_seed(1))
    data = (starts + torch.arange(17)) % 17  # counting: a pattern learnt within steps
    losses = []
    for batch in data:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, _ = net(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_bf16_autocast_trains_like_fp32():
    """bf16 keeps 8 bits of mantissa (relative error ~0.4% per matmul): the loss after 10 steps may differ by
    a hundredth or two (0.002 measured), while what training achieves (about 1.0 below the start) is 50x that."""
    fp32, bf16 = train_losses(10), train_losses(10, autocast=True)
    assert fp32[-1] < fp32[0] - 0.5 and bf16[-1] < bf16[0] - 0.5
    assert bf16[-1] == pytest.approx(fp32[-1], abs=0.02)


@pytest.mark.parametrize("flags, precision", [
    ("fpu sse2 avx2 fma", "32-true"),                       # this CI machine's kind: bf16 would be emulated
    ("fpu avx2 avx512f avx512bw", "32-true"),               # AVX-512 without its bf16 extension
    ("fpu avx512f avx512_bf16", "bf16-mixed"),
    ("fpu avx512f amx_bf16 amx_tile", "bf16-mixed"),
    (None, "32-true")])                                    # no /proc/cpuinfo
def test_cpu_trainer_uses_bf16_only_where_the_cpu_has_bf16_instructions(tmp_path, monkeypatch, flags, precision):
    monkeypatch.delenv("LAM_CPU_PRECISION", raising=False)  # .ci/run sets it
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x86\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(hardware, "cpu_flags", functools.partial(hardware.cpu_flags, cpuinfo))
    assert hardware.cpu_precision() == precision
    assert compose_train([], tmp_path).trainer.precision == "auto"  # measured_precision starts from it
    assert compose_train(["trainer.precision=${lam.cpu_precision:}"], tmp_path).trainer.precision == precision
    assert compose_train(["trainer.precision=32-true"], tmp_path).trainer.precision == "32-true"


@pytest.mark.parametrize("flags, precision, device, warned", [
    ("fpu sse2 avx2 fma", "bf16-mixed", "cpu", True),
    ("fpu sse2 avx2 fma", "bf16-true", "cpu", True),
    ("fpu sse2 avx2 fma", "32-true", "cpu", False),
    ("fpu sse2 avx2 fma", "bf16-mixed", "cuda", False),
    ("fpu avx512f avx512_bf16", "bf16-mixed", "cpu", False),
    (None, "bf16-mixed", "cpu", False)])                  # no /proc/cpuinfo: the flags are unknown
def test_bf16_on_a_cpu_that_emulates_it_is_named_as_slow(tmp_path, monkeypatch, flags, precision, device, warned):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"flags\t\t: {flags}\n")
    monkeypatch.setattr(hardware, "cpu_flags", functools.partial(hardware.cpu_flags, cpuinfo))
    why = hardware.emulated_bf16(precision, device)
    assert (why is not None) == warned
    if warned:
        assert why.startswith(f"trainer.precision={precision} on a CPU without bf16 instructions")


def test_lam_train_warns_when_it_trains_in_emulated_bf16(tmp_path, corpus, monkeypatch, caplog):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2\n")
    monkeypatch.setattr(hardware, "cpu_flags", functools.partial(hardware.cpu_flags, cpuinfo))
    for precision in ("bf16-mixed", "32-true"):
        caplog.clear()
        train(compose_train([*TINY, "data=custom", f"data.path={corpus}", "trainer.max_steps=1",
                             f"trainer.precision={precision}"], tmp_path / precision))
        warned = [r.message for r in caplog.records if "bfloat16 is emulated" in r.message]
        assert len(warned) == (precision == "bf16-mixed")


@pytest.mark.parametrize("flags", ["fpu avx2", "fpu avx512f avx512_bf16"])
@pytest.mark.parametrize("forced", ["32-true", "bf16-mixed"])
def test_lam_cpu_precision_answers_as_the_other_kind_of_cpu_would(tmp_path, monkeypatch, flags, forced):
    """LAM_CPU_PRECISION decides on either kind of CPU; a value that is no CPU precision is refused by name."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t\t: {flags}\n")
    monkeypatch.setattr(hardware, "cpu_flags", functools.partial(hardware.cpu_flags, cpuinfo))
    monkeypatch.setenv("LAM_CPU_PRECISION", forced)
    monkeypatch.setattr(hardware, "pass_ms", no_measuring)
    assert compose_train(["trainer.precision=${lam.cpu_precision:}"], tmp_path).trainer.precision == forced
    assert hardware.measured_precision(tiny_net(), 2, 8, 17)[0] == forced  # trainer.precision=auto
    monkeypatch.setenv("LAM_CPU_PRECISION", "16-mixed")
    with pytest.raises(Exception) as raised:  # OmegaConf wraps it; the entry points print it as one line
        compose_train(["trainer.precision=${lam.cpu_precision:}"], tmp_path).trainer.precision
    assert str(user_error(raised.value)).startswith("LAM_CPU_PRECISION=16-mixed is not a CPU precision: use "
                                                    "bf16-mixed or 32-true")


def no_measuring(*args, **kwargs):
    raise AssertionError("measured a step where the precision was known without it")


@pytest.fixture
def bf16_cpu(tmp_path, monkeypatch):
    """A CPU with bf16 instructions, nothing forcing its precision, and an empty measurements file."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    monkeypatch.setattr(hardware, "cpu_flags", functools.partial(hardware.cpu_flags, cpuinfo))
    monkeypatch.delenv("LAM_CPU_PRECISION", raising=False)
    monkeypatch.setenv("LAM_CACHE_DIR", str(tmp_path / "cache"))


def test_auto_precision_is_fp32_unmeasured_where_bf16_would_be_emulated(bf16_cpu, tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu sse2 avx2 fma\n")
    monkeypatch.setattr(hardware, "pass_ms", no_measuring)
    assert hardware.measured_precision(tiny_net(), 2, 8, 17) == ("32-true", "no bf16 instructions")
    assert not hardware.measurements_file().exists()


@pytest.mark.parametrize("fp32_ms, bf16_ms, chosen", [
    (10.0, 8.0, "bf16-mixed"),   # 1.25x faster
    (10.0, 9.5, "32-true"),      # 1.05x: a near tie keeps the exact precision
    (10.0, 30.0, "32-true")])
def test_auto_precision_takes_the_measured_faster_and_remembers_it(bf16_cpu, monkeypatch, fp32_ms, bf16_ms, chosen):
    """Measured once per model and machine: the same config trains alike on the same machine."""
    measured = []

    def pass_ms(net, tokens, precision):
        measured.append((type(net.blocks[0].attn), tuple(tokens.shape), precision))
        return {"32-true": fp32_ms, "bf16-mixed": bf16_ms}[precision]

    monkeypatch.setattr(hardware, "pass_ms", pass_ms)
    assert hardware.measured_precision(tiny_net(), 2, 8, 17)[0] == chosen
    # the two precisions take turns, round after round (an untimed one first)
    passes = 2 * 6
    assert measured == [(SoftmaxAttention, (2, 8), p) for _ in range(6) for p in hardware.CPU_PRECISIONS]
    assert hardware.measured_precision(tiny_net(seed=1), 2, 8, 17)[0] == chosen and len(measured) == passes
    hardware.measured_precision(tiny_net(LinearAttention), 2, 8, 17)  # another model: measured anew
    hardware.measured_precision(tiny_net(), 4, 8, 17)                 # another batch shape too
    assert len(measured) == 3 * passes and len(json.loads(hardware.measurements_file().read_text())) == 3


def test_auto_precision_keeps_its_measurements_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LAM_CACHE_DIR", str(tmp_path / "cache"))
    assert hardware.measurements_file() == tmp_path / "cache" / "precision.json"
    monkeypatch.delenv("LAM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hardware.measurements_file() == tmp_path / ".cache" / "lam" / "precision.json"


def test_auto_precision_measures_a_copy_and_leaves_the_run_untouched(bf16_cpu):
    """The trial steps run on a copy, with the run's random stream put back: seeded runs stay the same."""
    net = LAM(vocab_size=17, attention=SoftmaxAttention, n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.1)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    precision, why = hardware.measured_precision(net, 2, 8, 17)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
    assert all(p.grad is None for p in net.parameters())
    times = next(iter(json.loads(hardware.measurements_file().read_text()).values()))
    assert sorted(times) == sorted(hardware.CPU_PRECISIONS) and all(ms > 0 for ms in times.values())
    assert precision == hardware.faster(times) and "ms a pass (measured" in why


def test_lam_train_records_the_precision_auto_chose(bf16_cpu, tmp_path, corpus, monkeypatch, caplog):
    monkeypatch.setattr(hardware, "pass_ms", lambda net, tokens, precision: 1.0 if precision == "bf16-mixed" else 2.0)
    run = tmp_path / "run"
    caplog.set_level(logging.INFO)
    train(compose_train([*TINY, "data=custom", f"data.path={corpus}", "trainer.max_steps=2"], run))
    messages = [r.message for r in caplog.records]
    assert any(m.startswith("trainer.precision=auto: timing bf16-mixed against 32-true") for m in messages)
    assert any(m.startswith("trainer.precision=auto: bf16-mixed (") for m in messages)
    assert json.loads((run / "metrics.json").read_text())["precision"] == "bf16-mixed"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["lam"]["config"]["trainer"]["precision"] == "bf16-mixed"


def test_auto_precision_is_refused_off_the_cpu(tmp_path):
    with pytest.raises(UserError, match=r"^trainer.precision=auto is measured on the CPU \(trainer=cpu\)"):
        check_values(compose_train(["trainer=gpu", "trainer.precision=auto"], tmp_path))


@pytest.mark.parametrize("gpu", [False, True])
def test_auto_precision_with_an_auto_accelerator_is_measured_where_that_is_the_cpu(tmp_path, monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    cfg = compose_train(["trainer.accelerator=auto"], tmp_path)
    if gpu:
        with pytest.raises(UserError, match=r"^trainer.precision=auto is measured on the CPU"):
            check_values(cfg)
    else:
        check_values(cfg)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_matches_the_default_implementation(precision):
    """The two kernels round the update in another order: 1e-5 apart in float32, and under bf16 autocast within
    precisions.tolerance of batches of 4 x 16 tokens."""
    autocast = precision == "bf16-mixed"
    fused, default = (list(enumerate(train_losses(10, autocast, fused=fused))) for fused in (True, False))
    assert curves_agree(fused, default, precision, fp32=1e-5, tokens=4 * 16)


@pytest.mark.parametrize("attention", [
    pytest.param(SoftmaxAttention, id="softmax", marks=pytest.mark.slow),  # each compile: 20-30 s on 2 cores
    pytest.param(functools.partial(LinearAttention, chunk_size=8), id="linear")])
def test_compiled_and_eager_models_agree(attention):
    torch._dynamo.reset()
    net = tiny_net(attention)
    x = torch.randint(17, (2, 16), generator=torch.Generator().manual_seed(2))
    eager = net(x)[0]
    compiled = torch.compile(net)(x)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    compiled.sum().backward()  # the compiled backward runs too
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.slow  # compiling two graphs: ~20 s on 2 cores
@pytest.mark.precision
def test_validation_and_samples_do_not_recompile(tmp_path, corpus):
    """compile=true through lam.train: training compiles one graph, the first validation a second one (eval
    mode, no grad); the two later validations and the steps between them reuse both, and the samples after
    each validation (a prompt, then one token at a time) run eagerly instead of compiling graphs of their own."""
    torch._dynamo.reset()
    counters.clear()
    overrides = [*TINY, "data=custom", f"data.path={corpus}", "attention.chunk_size=8", "compile=true",
                 "trainer.max_steps=15", "trainer.val_check_interval=5", "callbacks.samples.max_new_tokens=4",
                 "callbacks.samples.prompts=[the,the king]"]
    train(compose_train(overrides, tmp_path))
    assert column(read_metrics(tmp_path), "val/loss")[-1][0] == 15  # three validations ran (steps done)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 6  # 2 prompts after each validation
    assert counters["stats"]["unique_graphs"] == 2


class Clock(L.Callback):
    """Wall-clock timestamps of the first batch's start and of every batch end, kept on the class for the test."""

    times: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        Clock.times = []

    def on_train_batch_start(self, *args) -> None:
        if not Clock.times:
            Clock.times.append(time.perf_counter())

    def on_train_batch_end(self, *args) -> None:
        Clock.times.append(time.perf_counter())


@pytest.mark.precision
def test_throughput_is_tokens_over_wall_time(tmp_path, corpus):
    """Each logged tokens/s = tokens of its WINDOW steps / their wall time, as an independent clock read in the
    same hooks sees it. At a logged step's end the callback's own logging (four calls of about 1 ms, twice that
    on a busy machine) runs between the two clocks' readings, which cancels between two logged steps but not
    in the first window, which starts at the first batch's start: a window's wall time agrees to 10 ms, or 2%
    of a window when that is more; a window lasts 50-200 ms here. `threads=1` sets torch's thread count."""
    torch.set_num_threads(2)
    overrides = [*TINY, "data=custom", f"data.path={corpus}", f"trainer.max_steps={STEPS}",
                 f"data.batch_size={BATCH}", f"data.block_size={BLOCK}", f"callbacks.throughput.window={WINDOW}",
                 f"trainer.log_every_n_steps={WINDOW}",  # a row per window (each row repeats the latest value)
                 # one validation, after the last step: Throughput's clock leaves validations out, this one would
                 # not (tests/test_tracking.py checks that they are left out)
                 f"trainer.val_check_interval={STEPS}",
                 "+callbacks.clock._target_=test_speed_switches.Clock", "threads=1"]
    train(compose_train(overrides, tmp_path))
    assert torch.get_num_threads() == 1
    rows = read_metrics(tmp_path)
    logged = column(rows, "tokens_per_sec")
    assert [s for s, _ in logged] == list(range(WINDOW, STEPS + 1, WINDOW))  # at the steps done
    for step, tokens_per_sec in logged:
        clock = Clock.times[step] - Clock.times[step - WINDOW]
        assert BATCH * BLOCK * WINDOW / tokens_per_sec == pytest.approx(clock, rel=0.02, abs=0.01)
    elapsed = column(rows, "elapsed_s")[-1][1]
    assert elapsed == pytest.approx(Clock.times[-1] - Clock.times[0], rel=0.02, abs=0.01)  # as the first window


@pytest.mark.parametrize("attention", ["softmax", "window"])
def test_cpu_float32_attends_in_float32_and_gives_back_the_autocast_dtype(attention):
    """attention.cpu_float32 (softmax, window): under bf16 autocast on a CPU the attention core runs on float32
    copies of q, k, v, the rest of the layer in bf16; false leaves all of it in bf16."""
    from lam.models.attention import SlidingWindowAttention
    from lam.models.attention.softmax import attend

    q, k, v = (torch.randn(2, 2, 8, 4).bfloat16() for _ in range(3))
    up = attend(q, k, v, True, is_causal=True)
    assert up.dtype == torch.bfloat16
    assert torch.equal(up, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16())
    assert torch.equal(attend(q, k, v, False, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))

    cls = SoftmaxAttention if attention == "softmax" else functools.partial(SlidingWindowAttention, window=8)
    x = torch.randn(2, 8, 16)
    outputs = {}
    for flag in (True, False):
        torch.manual_seed(0)
        layer = cls(d_model=16, n_head=2, cpu_float32=flag)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[flag] = layer(x)[0]
    torch.manual_seed(0)
    fp32 = cls(d_model=16, n_head=2)(x)[0]
    assert not torch.equal(outputs[True], outputs[False])  # the flag reaches the layer
    for y in outputs.values():
        assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), fp32, atol=0.05)
