"""A generation session that continues across turns (lam.chat): the network's state is kept between turns.

The state is the recurrent state for the linear family and the KV cache for softmax; each turn feeds only the
tokens the state has not seen: the last token sampled in the turn before (sampled, not yet fed) and the new text.
A model with learned positions sees at most its last block_size tokens. Past that, as `stream` does: each step
recomputes the last block_size tokens, or with `context_shift` the state restarts from the last half of them and
carries on (llama.cpp's context shift).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lam.models.sampling import context_begin, sample_penalized, stream_text
from lam.serving.model import Model, check_sampling, seeded_generator, stop_list


class Session:
    """The transcript of a conversation with `model` and the state that has read it. Sampling settings are
    attributes, changeable between turns; the penalties count the tokens of the reply being sampled (as
    `lam.models.sampling.stream`'s count a sample's); context_shift: as stream's."""

    def __init__(self, model: Model, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float = 1.0, stop: str | Sequence[str] | None = None, seed: int | None = None,
                 context_shift: bool = False, frequency_penalty: float = 0.0, presence_penalty: float = 0.0):
        self.model, self.context_shift = model, context_shift
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty
        self.stop = stop_list(stop)
        self.generator = seeded_generator(model.device, seed)
        self.reset()

    def reset(self) -> None:
        """Forget the transcript and the state."""
        self.ids: list[int] = []  # every token of the transcript, fed or not
        self.state, self.begin, self.fed = None, 0, 0  # the state has read self.ids[self.begin:self.fed]

    @torch.no_grad()
    def next_logits(self) -> torch.Tensor:
        """(1, vocab) logits after the whole transcript, feeding the state what it has not read."""
        limit = getattr(self.model.net, "max_context", None)
        if limit is not None and len(self.ids) - self.begin > limit:  # the context outgrew the position table
            self.begin = context_begin(len(self.ids), limit, self.context_shift, self.state is not None)
            self.state, self.fed = None, self.begin
        fresh = torch.tensor([self.ids[self.fed:]], device=self.model.device)
        logits, self.state = self.model.net(fresh, self.state)
        self.fed = len(self.ids)
        return logits[:, -1]

    def tokens(self, new_ids: list[int]) -> Iterator[int]:
        self.ids += new_ids
        if not self.ids:
            return
        counts = None  # of this reply's tokens (sample_penalized)
        for _ in range(self.max_new_tokens):
            nxt, counts = sample_penalized(self.next_logits(), counts, self.frequency_penalty, self.presence_penalty,
                                           self.temperature, self.top_k, self.top_p, self.generator)
            token = int(nxt)
            self.ids.append(token)  # read by the state with the next step, or the next turn
            yield token

    def turn(self, text: str) -> Iterator[str]:
        """Add `text` to the transcript and return the continuation's pieces, ending before a stop string (the
        tokens sampled stay in the transcript). A text the tokenizer cannot read, or a setting out of range, is
        refused here (UserError), before the transcript changes."""
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p,
                       frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty)
        return stream_text(self.tokens(self.model.tokenizer.encode(text)), self.model.tokenizer.decode, self.stop)
