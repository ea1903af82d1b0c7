"""Autoregressive sampling for any model with the `model(idx, state) -> (logits, state)` interface.

With `use_cache=True` each step feeds only the newest token and the state (KV cache, recurrent state);
without it every step recomputes the whole context. Both give the same tokens. Models with learned positions
(`max_context` set) see at most the last `max_context` tokens; past that each step recomputes a cropped window,
or, with `context_shift=True`, the context restarts from its last half and the cache carries on.
`compile=True` runs the one-token steps, and the windows recomputed past `max_context`, through torch.compile
(the prompt's pass, of any length, stays eager): the first call compiles for a few seconds, then each token
costs a fraction of the eager step's kernel launches.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its compiled one-token step


def compiled_step(model: nn.Module) -> Callable:
    """torch.compile(model) with dynamic shapes (the context grows every step), made once per model. Inductor's
    C++ wrapper calls the kernels of a step without Python in between: the default model's one-token steps
    went from 1,944 to 2,260 tokens/s for 10 s more of compiling (2-core AVX512-BF16 EPYC, one thread). Its
    caller continues each state once, as `stream` does: compiled, a KV cache does not copy on write."""
    if model not in COMPILED:
        COMPILED[model] = torch.compile(model, dynamic=True, options={"cpp_wrapper": True})
    return COMPILED[model]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, vocab) logits -> (B, 1) token ids. temperature 0 picks the most likely token; top_k keeps the k most
    likely tokens, top_p (nucleus sampling, Holtzman et al. 2019) the fewest whose probabilities reach p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before a token reached p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)


def penalized(logits: torch.Tensor, counts: torch.Tensor, frequency_penalty: float,
              presence_penalty: float) -> torch.Tensor:
    """OpenAI's penalties on (B, vocab) logits: each token's logit lowered by frequency_penalty times the times
    it was sampled so far (`counts`), and by presence_penalty once it was; negative values favour repeats."""
    return logits - frequency_penalty * counts - presence_penalty * (counts > 0)


def sample_penalized(logits: torch.Tensor, counts: torch.Tensor | None, frequency_penalty: float,
                     presence_penalty: float, temperature: float, top_k: int | None, top_p: float,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sample_next on (B, vocab) logits after the penalties over `counts` (how often each token was sampled so
    far; None before the first), and the counts with the sampled tokens added: (B, 1) ids and (B, vocab)
    counts, or None while no penalty asks for them."""
    if frequency_penalty or presence_penalty:
        counts = torch.zeros_like(logits, dtype=torch.float) if counts is None else counts
        logits = penalized(logits.float(), counts, frequency_penalty, presence_penalty)
    nxt = sample_next(logits, temperature, top_k, top_p, generator)
    if counts is not None:
        counts.scatter_add_(1, nxt, torch.ones_like(nxt, dtype=counts.dtype))
    return nxt, counts


def context_begin(length: int, limit: int, context_shift: bool, started: bool) -> int:
    """Where a context of `length` tokens that outgrew `limit` begins again: `limit` tokens back, or with
    context_shift once a state has started, half of that (at least one token)."""
    return length - (max(1, limit // 2) if context_shift and started else limit)


@torch.no_grad()
def stream(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float = 1.0, use_cache: bool = True,
           generator: torch.Generator | None = None, compile: bool = False, context_shift: bool = False,
           frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> Iterator[torch.Tensor]:
    """Yield (B, 1) new token ids one step at a time, continuing the (B, T) prompt `idx`. The penalties count
    the tokens sampled, not the prompt's (`penalized`).

    context_shift: what a model with learned positions does once the context fills its `max_context`. False:
    every step sees the last max_context tokens, recomputed (nanoGPT's generate). True: the context restarts
    from its last half, recomputed once, and grows one cached token at a time until full again (llama.cpp's
    context shift): each token sees max_context/2 to max_context tokens, at about the cost of a cached step."""
    limit = getattr(model, "max_context", None)
    step = compiled_step(model) if compile and use_cache else model
    seq, state, begin = idx, None, 0  # the model sees seq[:, begin:]
    counts = None  # (B, vocab): how often each token was sampled, where a penalty asks for it
    for i in range(max_new_tokens):
        if limit is not None and seq.shape[1] - begin > limit:  # the window outgrew the position table
            begin = context_begin(seq.shape[1], limit, context_shift, state is not None)
            if context_shift:
                state = None
        window = seq[:, begin:]
        if not use_cache or i == 0:  # the prompt's pass (of any length: eager), or every step uncached
            logits, state = model(window)
        else:
            # one token on the state; else a shifted context's max_context/2 tokens from no state, or past
            # max_context without context_shift the whole window, every step
            one_token = state is not None and (begin == 0 or context_shift)
            try:
                logits, state = step(seq[:, -1:], state) if one_token else step(window)
            except Exception as e:  # torch.compile's failures have many types; eager gives the same tokens
                if step is model:
                    raise
                warnings.warn(f"torch.compile failed on a decoding step ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); decoding eagerly", stacklevel=2)
                step = COMPILED[model] = model
                logits, state = model(window)  # from the tokens alone: the failed call may have left the state
        nxt, counts = sample_penalized(logits[:, -1], counts, frequency_penalty, presence_penalty, temperature,
                                       top_k, top_p, generator)
        seq = torch.cat((seq, nxt), dim=1)
        yield nxt


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt followed by `max_new_tokens` sampled ids, (B, T + max_new_tokens)."""
    return torch.cat([idx, *stream(model, idx, max_new_tokens, **kwargs)], dim=1)


def stream_text(tokens: Iterator[int], decode: Callable[[list[int]], str],
                stop: Sequence[str] = ()) -> Iterator[str]:
    """The text of a stream of token ids, in pieces as it grows, ending before the first stop string. A piece
    holds back a multi-byte character still incomplete and any tail that could begin a stop string."""
    stop = [s for s in stop if s]
    ids: list[int] = []
    shown = 0
    for token in tokens:
        ids.append(token)
        text = decode(ids).rstrip("\ufffd")
        ends = [i for i in (text.find(s, max(0, shown - len(s) + 1)) for s in stop) if i >= 0]
        if ends:
            if min(ends) > shown:
                yield text[shown:min(ends)]
            return
        held = max((n for s in stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        if len(text) - held > shown:
            yield text[shown:len(text) - held]
            shown = len(text) - held
    text = decode(ids)
    if len(text) > shown:
        yield text[shown:]
