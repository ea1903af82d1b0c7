"""LAM: config-driven experiments with small language models."""

__version__ = "0.1.0"
