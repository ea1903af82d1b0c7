"""Models in plain PyTorch: the LAM decoder, baselines, attention mechanisms and the sampling loop."""

from lam.models.baselines import Bigram, NGram
from lam.models.decoder import LAM
from lam.models.sampling import generate, stream

__all__ = ["LAM", "Bigram", "NGram", "generate", "stream"]
