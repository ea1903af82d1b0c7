"""LAM: config-driven experiments with small language models."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """The trained model in a model file (`python -m lam.export`): a `lam.serving.Model` with `generate`,
    `stream`, `perplexity`, `info`, `net` and `tokenizer`. Imports torch on first use, not with `import lam`."""
    from lam.serving.model import load as load_model

    return load_model(path, device)
