"""Corpora, tokenizers and the DataModule."""

from lam.data.corpora import Download, LocalText
from lam.data.datamodule import TextDataModule
from lam.data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

__all__ = ["CharTokenizer", "Download", "LocalText", "TextDataModule", "Tokenizer", "load_tokenizer"]
