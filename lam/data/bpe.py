"""Byte-level BPE: trained here on the corpus, then encoded and decoded by tiktoken from the learned ranks.

Training splits the text into pre-tokens with a regex, counts each distinct pre-token once with its
frequency, then repeatedly merges the most frequent adjacent pair of tokens. Pair counts are updated
incrementally: only the pre-tokens that contain the merged pair are revisited (found through a pair ->
pre-tokens index), and the next pair comes off a max-heap whose stale entries are refreshed lazily.
"""

from __future__ import annotations

import heapq
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import regex
import tiktoken
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lam.data.tokenizer import ENDOFTEXT, Tokenizer
from lam.errors import UserError

# GPT-4's pre-tokenisation (tiktoken's cl100k_base): merges never cross the boundaries of these pieces.
# In order: English contractions ('s 'll ...), a word with at most one leading non-letter (usually the space
# before it), numbers in groups of at most 3 digits, punctuation runs with their leading space and trailing
# newlines, and whitespace, where a run of spaces leaves its last space to the word that follows. Chosen over
# GPT-2's pattern because it keeps newlines out of words, caps digit runs at 3, and matches contractions in
# any case ("'S" in SHOUTING).
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

Pair = tuple[int, int]


class BPETokenizer(Tokenizer):
    """Byte-level BPE with `vocab_size` = 256 bytes + learned merges + special tokens.

    `ranks` holds the learned merges in rank order: ranks[i] is the token of id 256 + i, its bytes written
    as latin-1 text (one character per byte) so the state stays JSON. Special tokens take the ids after the
    merges. Special tokens appearing in text are encoded as ordinary text; `eot_id` is for joining documents.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        pattern: str = GPT4_SPLIT_PATTERN,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        ranks: Sequence[str] | None = None,
    ):
        special_tokens = list(special_tokens)
        if vocab_size < 256 + len(special_tokens):
            raise UserError(
                f"BPE vocab_size={vocab_size} is too small: it needs at least 256 (bytes) + "
                f"{len(special_tokens)} (special tokens) = {256 + len(special_tokens)}"
            )
        self.vocab_size = vocab_size
        self.pattern = pattern
        self.special_tokens = special_tokens
        self.ranks: list[str] | None = None
        self.encoding: tiktoken.Encoding | None = None
        if ranks is not None:
            if vocab_size != 256 + len(ranks) + len(special_tokens):
                raise ValueError(
                    f"BPE vocab_size={vocab_size} does not match its {len(ranks)} ranks + 256 bytes + "
                    f"{len(special_tokens)} special tokens"
                )
            self._set_ranks(list(ranks))

    @property
    def needs_training(self) -> bool:
        return self.ranks is None

    def _set_ranks(self, ranks: list[str]) -> None:
        mergeable_ranks = {bytes([b]): b for b in range(256)}
        mergeable_ranks.update((token.encode("latin-1"), 256 + i) for i, token in enumerate(ranks))
        if len(mergeable_ranks) != 256 + len(ranks):
            raise ValueError("BPE ranks must be distinct multi-byte tokens")
        first_special = len(mergeable_ranks)
        specials = {token: first_special + i for i, token in enumerate(self.special_tokens)}
        self.encoding = tiktoken.Encoding(name=f"lam_bpe_{first_special}", pat_str=self.pattern,
                                          mergeable_ranks=mergeable_ranks, special_tokens=specials)
        self.ranks = ranks
        self.vocab_size = first_special + len(specials)
        self.eot_id = specials.get(ENDOFTEXT)

    def train(self, text: str | Iterable[str]) -> None:
        n_merges = self.vocab_size - 256 - len(self.special_tokens)
        merged = train_bpe(text, n_merges, self.pattern)
        if len(merged) < n_merges:
            warnings.warn(f"BPE training text ran out of pairs after {len(merged)} of {n_merges} merges",
                          stacklevel=2)
        self._set_ranks([token.decode("latin-1") for token in merged])

    def encode(self, text: str) -> list[int]:
        if self.encoding is None:
            raise RuntimeError("BPETokenizer is not trained: call train(text) first")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        if self.encoding is None:
            raise RuntimeError("BPETokenizer is not trained: call train(text) first")
        return self.encoding.decode(list(ids))

    def config(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "ranks": self.ranks,
        }


def train_bpe(text: str | Iterable[str], n_merges: int, pattern: str = GPT4_SPLIT_PATTERN) -> list[bytes]:
    """Learn up to `n_merges` merges on `text`, one string or its pieces (documents, or parts of one cut at
    line breaks: pre-tokens never span two pieces); returns the merged tokens' bytes in rank order.

    The most frequent pair wins, ties going to the pair with the smallest (left id, right id), so the result
    depends only on the text. Should a pair's bytes already be a token (the same bytes split differently), the
    pair merges into that token without taking a new id, as tiktoken needs every token's bytes to be distinct.
    """
    chunk_counts = Counter()  # streamed: memory grows with the distinct pre-tokens, not with the text
    for piece in [text] if isinstance(text, str) else text:
        chunk_counts.update(regex.findall(pattern, piece))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    pair_counts: dict[Pair, int] = defaultdict(int)
    words_with_pair: dict[Pair, set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            words_with_pair[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([b]) for b in range(256)]
    token_id = {token: i for i, token in enumerate(token_bytes)}
    console = Console(stderr=True)
    columns = (TextColumn("BPE merges"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("merge", total=n_merges)
        while len(token_bytes) - 256 < n_merges and heap:
            neg_count, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count == 0:
                continue
            if count != -neg_count:  # stale: this pair's count dropped since it was pushed
                heapq.heappush(heap, (-count, pair))
                continue

            merged = token_bytes[pair[0]] + token_bytes[pair[1]]
            new_id = token_id.get(merged)
            if new_id is None:
                new_id = token_id[merged] = len(token_bytes)
                token_bytes.append(merged)
                progress.advance(task)

            grown: set[Pair] = set()  # a merge only adds pairs that contain the merged token
            for w in words_with_pair.pop(pair):
                old, freq = words[w], freqs[w]
                new = words[w] = merge_pair(old, pair, new_id)
                old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
                for p in old_pairs:
                    pair_counts[p] -= freq
                for p in new_pairs:
                    pair_counts[p] += freq
                    words_with_pair[p].add(w)
                    if new_id in p:
                        grown.add(p)
                for p in set(old_pairs).difference(new_pairs).difference([pair]):
                    words_with_pair[p].discard(w)
            del pair_counts[pair]
            for p in grown:
                heapq.heappush(heap, (-pair_counts[p], p))
    return token_bytes[256:]


def merge_pair(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """`word` with every non-overlapping occurrence of `pair`, left to right, replaced by `new_id`."""
    merged, i, last = [], 0, len(word) - 1
    while i <= last:
        if i < last and word[i] == pair[0] and word[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged
