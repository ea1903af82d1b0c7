"""The LightningModule: next-token cross-entropy, AdamW with weight-decay groups, warmup + cosine schedule."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from torch import nn
from torchmetrics import MeanMetric


def param_groups(net: nn.Module) -> list[dict]:
    """[hidden matrices, output head, the rest]: decay matrices of linear layers; leave norms, biases and
    embeddings (and the head tied to one) alone. An untied head (`net.lm_head` with a weight of its own) is
    decayed too, in a group of its own that appears only when it trains, so that MuonAdamW gives it to AdamW:
    Muon is for hidden matrices. The decayed groups name no weight decay, so they take the optimizer's own."""
    no_decay = {id(m.weight) for m in net.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))}
    head = getattr(getattr(net, "lm_head", None), "weight", None)
    if head is not None and (id(head) in no_decay or not head.requires_grad):
        head = None  # tied to the embedding, or frozen: no group of its own
    decay, other = [], []
    for p in net.parameters():  # parameters() yields a tied weight once
        if p.requires_grad and p is not head:
            (decay if p.dim() >= 2 and id(p) not in no_decay else other).append(p)
    head_group = [] if head is None else [{"params": [head]}]
    return [{"params": decay}, *head_group, {"params": other, "weight_decay": 0.0}]


class LanguageModel(L.LightningModule):
    """net: a model with `net(idx, state) -> (logits, state)`; optimizer: a callable taking parameter groups
    (its own weight decay applies to the decayed groups); scheduler: a partial taking the optimizer;
    compile: torch.compile the net; config: the run's resolved config, saved in every checkpoint."""

    def __init__(self, net: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                 compile: bool = False, config: dict | None = None):
        super().__init__()
        self.net, self.optimizer, self.scheduler, self.config = net, optimizer, scheduler, config or {}
        if compile:
            self.net.compile()
        self.val_loss = MeanMetric()
        self.validated_at: int | None = None  # the global step of the latest validation
        # the step metrics of the step being made (train/loss, lr, grad_norm, the Throughput callback's rates),
        # written to the loggers when it ends, and the last ones written (the progress bar shows them)
        self.step_metrics: dict = {}
        self.step_metrics_at: int | None = None
        self.logged_step_metrics: dict[str, float] = {}

    def __setattr__(self, name: str, value) -> None:
        """Lightning sets `_current_fx_name` (a hook's name, a string) before and after every hook, about 50
        times a step; nn.Module's __setattr__, which first looks whether the value is a parameter, buffer or
        module, made that 0.2 ms of a tiny model's step (benchmarks/RESULTS.md, Training speed)."""
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)[0]

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def logs_this_step(self) -> bool:
        """Whether the step being made writes step metrics: every trainer.log_every_n_steps-th step, and the
        last."""
        every = self.trainer.log_every_n_steps
        return every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        if self.logs_this_step():  # under DDP: the mean over all ranks (every rank logs at the same steps)
            self.step_metrics = {"train/loss": self.trainer.strategy.reduce(loss.detach(), reduce_op="mean"),
                                 "lr": self.optimizers().param_groups[0]["lr"]}
            self.step_metrics_at = self.global_step + 1
        return loss

    def writes_step_metrics(self) -> bool:
        """Whether the batch that just ended made a step whose metrics go to the loggers (under gradient
        accumulation, the batch that stepped the optimizer)."""
        return bool(self.step_metrics) and self.global_step == self.step_metrics_at

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Write the step's metrics to every logger, one record per step. Not through `self.log`: its result
        collection was one of the largest costs of Lightning's loop around a small model's step
        (benchmarks/RESULTS.md, Training speed). Validation metrics still go through it."""
        if self.writes_step_metrics():
            self.logged_step_metrics = {k: float(v) for k, v in self.step_metrics.items()}
            for logger in self.loggers:
                logger.log_metrics(self.logged_step_metrics, step=self.global_step)
            self.step_metrics = {}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip as trainer.gradient_clip_val / gradient_clip_algorithm say (by global norm unless "value") and
        log the global norm before clipping, both of the true gradients under every precision.

        Under a loss scaler (16-mixed) Lightning unscales before this hook, except for an optimizer that
        unscales inside its step (fused AdamW): those gradients are unscaled here, and the step then gets the
        scaler's inf check without the scale. Clipping does not go through `self.clip_gradients`, which refuses
        such an optimizer under any mixed precision (bf16 has no scaler at all): the gradients are true ones."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and _optimizer_handles_unscaling(optimizer):
            scaler.unscale_(optimizer)
        # the optimizer's parameters, those that train: a list, not self.parameters()'s walk over the modules
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf)  # measures only
            if gradient_clip_val:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:  # one pass: measures and clips
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val or math.inf)
        if self.logs_this_step():
            self.step_metrics["grad_norm"] = norm

    def validation_step(self, batch, batch_idx: int) -> None:
        self.val_loss.update(self.loss(batch), weight=batch[0].shape[0])

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        # the metric has already gathered every rank's batches: each rank holds the same value
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True, sync_dist=True)
        self.validated_at = self.global_step

    def configure_optimizers(self):
        optimizer = self.optimizer(param_groups(self.net))
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Everything `lam.generate` needs to rebuild the model and its tokenizer from the file alone, as plain
        JSON values: `torch.load(weights_only=True)` reads them back (a value JSON cannot hold fails here)."""
        lam = {"config": self.config}
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            lam["tokenizer"] = datamodule.tokenizer.state_dict()
        checkpoint["lam"] = json.loads(json.dumps(lam))
