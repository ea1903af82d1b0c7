"""Using a trained model without Lightning or Hydra: the model file, `Model`, generation sessions, the server."""

from lam.serving.model import Model, load

__all__ = ["Model", "load"]
