"""The tokenizer interface, and the character tokenizer.

Every tokenizer is built from its config (untrained), trained once by the DataModule on the training text, and
then saved as a JSON-serialisable state dict with every run and checkpoint; `load_tokenizer` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from lam.errors import UserError

ENDOFTEXT = "<|endoftext|>"  # the special token that joins documents, where a tokenizer has one (eot_id)


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `vocab_size` once trained (or on construction if fixed)."""

    vocab_size: int
    eot_id: int | None = None  # id of the end-of-text token joining documents, where the tokenizer has one

    @property
    def needs_training(self) -> bool:
        return False

    def train(self, text: str | Iterable[str]) -> None:
        """Learn the vocabulary from training text, one string or its pieces (fixed vocabularies: a no-op)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def config(self) -> dict:
        """The constructor arguments plus whatever training learned: enough to rebuild an equal tokenizer."""

    def state_dict(self) -> dict:
        return {"class": class_name(type(self)), **self.config()}

    def fingerprint(self) -> str:
        """A short hash of the tokenizer's identity: class, settings and trained vocabulary."""
        blob = json.dumps(self.state_dict(), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.state_dict(), ensure_ascii=False, indent=1), encoding="utf-8")


def load_tokenizer(state: dict | str | Path, trusted: tuple[type[Tokenizer], ...] = ()) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.state_dict()` (a dict, or the path of a file that `save` wrote).
    Its class must be one of LAM's or of `trusted` (the class a run's own config built)."""
    if not isinstance(state, dict):
        state = json.loads(Path(state).read_text(encoding="utf-8"))
    state = dict(state)
    name = state.pop("class", None)
    classes = {**tokenizer_classes(), **{class_name(cls): cls for cls in trusted}}
    if name not in classes:
        raise UserError(f"tokenizer class {name!r} is not one of LAM's ({', '.join(sorted(classes))})")
    try:
        return classes[name](**state)
    except TypeError as e:  # arguments the class does not take
        raise UserError(f"a saved {name.rpartition('.')[2]} does not fit LAM's: {e}") from None


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def tokenizer_classes() -> dict[str, type[Tokenizer]]:
    """LAM's tokenizers by the name their state dicts carry: the only classes `load_tokenizer` builds (no
    class is imported by a name read from a file)."""
    from lam.data.bpe import BPETokenizer  # they import this module
    from lam.data.tiktoken_named import TiktokenTokenizer

    return {class_name(cls): cls for cls in (CharTokenizer, BPETokenizer, TiktokenTokenizer)}


def check_same_tokenizer(path: str | Path, expected: Tokenizer, owner: str) -> Tokenizer:
    """The tokenizer saved at `path` (a tokenizer.json), checked to be `expected`, the one that `owner`
    (a checkpoint, say) was trained with."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer {path} does not exist")
    try:
        given = load_tokenizer(path)
    except (ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"{path} is not a tokenizer saved by LAM ({type(e).__name__}: {e})") from None
    if given.fingerprint() != expected.fingerprint():
        raise UserError(f"tokenizer {path} ({describe(given)}) differs from the one {owner} was trained with "
                        f"({describe(expected)}): its token ids would mean other text")
    return given


def describe(tokenizer: Tokenizer) -> str:
    """e.g. "BPETokenizer, 4096 tokens, fingerprint 1a2b3c4d5e6f7a8b"."""
    return f"{type(tokenizer).__name__}, {tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint()}"


class CharTokenizer(Tokenizer):
    """One token per Unicode character of the corpus (nanoGPT's shakespeare_char). The alphabet is taken from
    the whole text, validation included, so no validation character is unknown; it learns no statistics."""

    vocab_from_all_text = True

    def __init__(self, chars: str | None = None):
        self.chars = chars
        if chars is not None:
            self._set_vocab(chars)

    def _set_vocab(self, chars: str) -> None:
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @property
    def needs_training(self) -> bool:
        return self.chars is None

    def train(self, text: str | Iterable[str]) -> None:
        chars: set[str] = set()
        for piece in [text] if isinstance(text, str) else text:
            chars.update(piece)
        self._set_vocab("".join(sorted(chars)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary (the {self.vocab_size} "
                            "characters of the training text); use text made of those, or a BPE tokenizer") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def config(self) -> dict:
        return {"chars": self.chars}
