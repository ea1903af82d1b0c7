"""A run's Python logging: Lightning's messages reach the terminal and the run's train.log (Hydra's handlers),
less those that tell nothing about the run."""

from __future__ import annotations

import logging
import warnings

# Warnings that say nothing about the run: the model summary sizes parameters in 32 bits under any precision,
# and Lightning 2.6 calls a torch pytree API that torch 2.10 deprecated.
warnings.filterwarnings("ignore", message="Precision .* is not supported by the model summary")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

# Lightning's messages that tell nothing about this run: kept in train.log, left off the terminal
# (the last: lam's own full checkpoints, the interrupted one and the end's best/last, are saved with
# Lightning's default, every state; Lightning says so at each save)
NOT_ON_THE_TERMINAL = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:",
                       "Trainer already configured with model summary callbacks", "`weights_only` was not set")


class LeaveOff(logging.Filter):
    """Drops the records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)



def log_to_the_run() -> None:
    """Lightning's loggers print through handlers of their own (set up at import, before Hydra configured
    logging): hand their records to the root logger instead, whose handlers Hydra points at the terminal and at
    the run's train.log. The terminal leaves out NOT_ON_THE_TERMINAL."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(LeaveOff(NOT_ON_THE_TERMINAL))
