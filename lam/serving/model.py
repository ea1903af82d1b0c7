"""A trained model ready to use: `lam.load(path)` returns a `Model` (no Lightning, no Hydra).

    m = lam.load("shakespeare.lam")
    m.generate("ROMEO:", max_new_tokens=200, temperature=0.8, top_k=50, seed=1)
    for piece in m.stream("JULIET:"): print(piece, end="")
    m.perplexity(open("sonnets.txt").read())
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lam.data.tokenizer import Tokenizer, describe
from lam.errors import UserError
from lam.models.sampling import stream as stream_tokens
from lam.models.sampling import stream_text
from lam.serving import model_file


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float,
                   allow_zero_tokens: bool = True, frequency_penalty: float = 0.0,
                   presence_penalty: float = 0.0) -> None:
    """A UserError naming the first sampling parameter out of its range."""
    least = 0 if allow_zero_tokens else 1
    if not isinstance(max_new_tokens, int) or max_new_tokens < least:
        raise UserError(f"max_new_tokens must be an integer >= {least}, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature < math.inf:
        raise UserError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k must be an integer >= 1, or null for all tokens, got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1: all tokens), got {top_p!r}")
    for name, penalty in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not -2 <= penalty <= 2:
            raise UserError(f"{name} must be between -2 and 2 (0: none), got {penalty!r}")


def check_switches(**switches) -> None:
    """A UserError naming the first switch that is not true or false."""
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")


def text_only(text: str, name: str) -> str:
    """`text`, or a TypeError naming `name` where it is not one string (a list of prompts is not a batch)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be one string, got {type(text).__name__}")
    return text


def seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator for sampling on `device`, seeded with `seed` (None: a fresh random seed)."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise UserError(f"seed must be an integer, or null for a fresh one, got {seed!r}")
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def stop_list(stop: str | Sequence[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


class Model:
    """A network and its tokenizer. `net` is the plain PyTorch model (`net(idx, state) -> (logits, state)`),
    `tokenizer` its tokenizer, `config` the model config, `record` the training record of its file."""

    def __init__(self, net: nn.Module, tokenizer: Tokenizer, config: dict, record: dict | None = None):
        self.net, self.tokenizer, self.config, self.record = net.eval(), tokenizer, config, record or {}

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Model:
        f = model_file.read(path, device)
        return cls(f.net, f.tokenizer, f.config, f.record)

    def save(self, path: str | Path) -> Path:
        return model_file.save(path, self.net, self.tokenizer, self.config, self.record)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def info(self) -> dict:
        """What /v1/models tells about the model."""
        attention = self.config.get("attention")
        attention = attention.get("_target_", "") if isinstance(attention, dict) else ""
        return {"parameters": sum(p.numel() for p in self.net.parameters()),
                "model": type(self.net).__name__,
                "attention": attention.rpartition(".")[2] or None,
                "pos": self.config.get("pos"),
                "block_size": getattr(self.net, "block_size", None),
                "vocab_size": self.tokenizer.vocab_size, "tokenizer": describe(self.tokenizer),
                "record": self.record}

    def summary(self) -> str:
        """One line: the parameter count, the attention and positions (or the model's class, for a model without
        attention) and the tokenizer."""
        info = self.info
        kind = f"{info['attention']}, {info['pos']} positions" if info["attention"] else info["model"]
        return f"{info['parameters']:,} parameters, {kind}, {info['tokenizer']}"

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer.encode(text_only(prompt, "prompt"))
        if not ids:
            raise UserError("the prompt is empty: give at least one character, e.g. '\\n'")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def stream(self, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
               top_p: float = 1.0, seed: int | None = None, stop: str | Sequence[str] | None = None,
               sampled: list[int] | None = None, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0) -> Iterator[str]:
        """The continuation of `prompt`, in text pieces as they are sampled, ending before a stop string.
        `sampled`, where given, receives the id of each token sampled (a stop string's too). The penalties
        (-2 to 2) lower the logits of the tokens already sampled, as OpenAI's do."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, frequency_penalty=frequency_penalty,
                       presence_penalty=presence_penalty)
        idx = self.encode_prompt(prompt)
        generator = seeded_generator(self.device, seed)

        def tokens() -> Iterator[int]:
            for t in stream_tokens(self.net, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, generator=generator, frequency_penalty=frequency_penalty,
                                   presence_penalty=presence_penalty):
                if sampled is not None:
                    sampled.append(t.item())
                yield t.item()

        yield from stream_text(tokens(), self.tokenizer.decode, stop_list(stop))

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float = 1.0, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> str:
        """The continuation of `prompt` (without the prompt)."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                   frequency_penalty=frequency_penalty, presence_penalty=presence_penalty))

    @torch.no_grad()
    def logprobs(self, ids: Sequence[int], start: int = 1, top: int = 0) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each position i >= start (>= 1) of `ids`: the log-probability of ids[i] after ids[:i], as the model
        gives it at temperature 1 and sampling sees it (from the last max_context tokens where the positions are
        learned), with the `top` most likely ids there and theirs."""
        vocab = self.tokenizer.vocab_size
        if bad := [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab]:
            raise ValueError(f"ids must be token ids, integers in [0, {vocab}); got {bad[0]!r}")
        if len(ids) < 2:  # no token with one before it to score
            return []
        limit, n = getattr(self.net, "max_context", None), len(ids)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        rows = []  # rows[j]: the log-probabilities of the token after ids[:j + 1]
        whole = n - 1 if limit is None else min(n - 1, limit)
        if whole:
            rows += list(self.net(tokens[:, :whole])[0][0].float().log_softmax(-1))
        for i in range(whole + 1, n):  # past the position table: the window sampling recomputes
            rows.append(self.net(tokens[:, i - limit:i])[0][0, -1].float().log_softmax(-1))
        scored = []
        for i in range(max(start, 1), n):
            best = rows[i - 1].topk(min(top, len(rows[i - 1]))) if top else None
            scored.append((rows[i - 1][ids[i]].item(), [] if best is None else list(
                zip(best.indices.tolist(), best.values.tolist()))))
        return scored

    @torch.no_grad()
    def perplexity(self, text: str) -> float:
        """exp of the mean next-token loss over `text`, read in consecutive windows of block_size tokens (each
        window from a fresh context, as validation reads its windows)."""
        ids = self.tokenizer.encode(text_only(text, "text"))
        if len(ids) < 2:
            raise UserError("perplexity needs a text of at least two tokens")
        window = getattr(self.net, "block_size", None) or len(ids)
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            piece = tokens[start:start + window + 1]
            logits = self.net(piece[None, :-1])[0][0]
            total += F.cross_entropy(logits.float(), piece[1:], reduction="sum").item()
            count += len(piece) - 1
        return math.exp(total / count)


def load(path: str | Path, device: str = "cpu") -> Model:
    """The model in the file at `path` (written by `python -m lam.export`)."""
    return Model.load(path, device)
