"""The precisions the tests train in, as overrides, and the rounding of each, from which tolerances are derived.

Exact comparisons pin `32-true`; their `bf16-mixed` twins allow what bf16's rounding can explain. A precision a
test does not pin is the CPU trainer's default, `auto`, which under the tests is this CPU kind's
(`${lam.cpu_precision:}`, tests/conftest.py), or the other CPU kind's where LAM_CPU_PRECISION says so (.ci/run
runs the tests marked `precision` both ways).
"""

# Lightning turns trainer.precision=16-mixed into bf16-mixed on a CPU; its plugin, given directly, runs float16
# autocast with a GradScaler there (torch.amp.GradScaler("cpu"), torch >= 2.3)
FP16_MIXED_ON_CPU = [
    "trainer.precision=null",
    "+trainer.plugins=[{_target_:lightning.pytorch.plugins.precision.MixedPrecision,precision:16-mixed,"
    "device:cpu,scaler:{_target_:torch.amp.GradScaler,device:cpu}}]",
]
PRECISION = {"32-true": ["trainer.precision=32-true"], "bf16-mixed": ["trainer.precision=bf16-mixed"],
             "16-mixed": FP16_MIXED_ON_CPU}

# Unit roundoff: the most that rounding one operation's result to nearest errs by, relative, 2**-p for a format
# of p significant bits: bf16 8, float16 11, float32 24
EPS = {"32-true": 2.0**-24, "bf16-mixed": 2.0**-8, "16-mixed": 2.0**-11}

# A bf16-mixed twin of an exact comparison allows a loss 2**-8 / sqrt(n) of itself, n the tokens it averages
# (3.5e-4 of it at TINY's 128 tokens a batch: 0.001 at a loss of 3). Derivation: bf16 keeps 8 significant bits,
# so where two runs round a value differently (one ordered a sum otherwise, as DDP's all-reduce does against one
# backward over the joined batch) the two roundings are one step, 2**-8 of it, apart. A token's loss inherits at
# most that relative difference from its logits; the n tokens of a batch round independently, with random sign,
# so their mean moves by about 2**-8 / sqrt(n) of itself (the probabilistic rounding-error bound: a random walk
# of n steps), not by 2**-8, as it would if every token went the same way. Runs that do the same sums in the
# same order round alike and agree exactly. Each test says what its training moves by when it is wrong.
TINY_TOKENS = 4 * 32  # data.batch_size x data.block_size of helpers.TINY: the least a compared loss averages


def tolerance(precision: str, value: float, fp32: float = 0.0, tokens: int = TINY_TOKENS) -> float:
    """How far `value`, a loss averaged over at least `tokens` tokens, may be from the same training's value in
    another run: `fp32` (the test's own, exact by default) in 32-true, 2**-8 / sqrt(tokens) of it in
    bf16-mixed."""
    return fp32 if precision == "32-true" else EPS["bf16-mixed"] / tokens**0.5 * abs(value)


def curves_agree(curve: list[tuple[int, float]], expected: list[tuple[int, float]], precision: str,
                 fp32: float = 0.0, tokens: int = TINY_TOKENS) -> bool:
    """Whether two (step, loss) curves log the same steps with losses within `tolerance`."""
    return [s for s, _ in curve] == [s for s, _ in expected] and all(
        abs(a - b) <= tolerance(precision, b, fp32, tokens) for (_, a), (_, b) in zip(curve, expected))
