"""Corpora and tokenizers, in plain Python and NumPy: no Lightning, no model."""

from lam.data.corpora import Download, LocalText
from lam.data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

__all__ = ["CharTokenizer", "Download", "LocalText", "Tokenizer", "load_tokenizer"]
