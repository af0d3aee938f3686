"""A LightningModule that trains any image classifier with SGD or natural-gradient descent."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ImageClassifier"]

_OPTIMIZERS = ("sgd", "ngd")
_FISHER_TYPES = ("empirical", "true")
#: ``optimizer.stats`` keys logged per epoch (mean over the epoch's steps) as ``ngd/<key>``.
NGD_STAT_KEYS = ("kappa", "fisher_trace", "update_norm")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier trained with SGD or NGD.

    Logs ``train/loss``, ``train/acc`` (epoch means), ``val/loss``, ``val/acc``, ``test/loss``,
    ``test/acc`` (x-axis: completed training epochs, like the curvature callbacks) and, with NGD,
    the epoch means of the optimizer's per-step statistics: ``ngd/kappa`` (damping
    κ = α·max(tr F, ε)/d), ``ngd/fisher_trace`` (tr F) and ``ngd/update_norm``
    (‖θ_{t+1} − θ_t‖). When an ``OptimizerMonitor`` callback is attached it owns these tags and
    the module does not log them a second time.

    Parameters
    ----------
    model : nn.Module
        Maps images to logits (e.g. :class:`~lightning_curvature.models.MLP`); from YAML as
        ``class_path``/``init_args``.
    optimizer : {"sgd", "ngd"}
        ``torch.optim.SGD`` or :class:`lightning_curvature.optim.NGD`.
    lr, momentum, weight_decay : float
        Shared by both optimizers.
    alpha, eps, fisher_type :
        NGD only: damping κ = α·max(tr F, ε)/d and the Fisher ("empirical" or "true").
    num_classes : int, optional
        For the accuracy metrics; default ``model.num_classes`` if it exists, else 10.
    restore_optimizer_state : bool
        When resuming from a checkpoint, also restore the optimizer's state. ``False`` starts a
        fresh optimizer from the restored weights and loop counters (how ``split`` branches switch
        optimizer).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Literal["sgd", "ngd"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        alpha: float = 0.01,
        eps: float = 1e-10,
        fisher_type: Literal["empirical", "true"] = "empirical",
        weight_decay: float = 0.0,
        num_classes: int | None = None,
        restore_optimizer_state: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        if fisher_type not in _FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {_FISHER_TYPES}, got {fisher_type!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()
        if num_classes is None:
            num_classes = int(getattr(model, "num_classes", 10))
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _shared_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        metric(logits.detach(), y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "train")
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage != "train")
        if stage == "train":
            # Live value for the progress bar only: loggers get epoch means, see _log_epoch_axis.
            self.log("loss", loss, on_step=True, on_epoch=False, prog_bar=True, logger=False)
        return loss

    def _log_epoch_axis(self) -> None:
        # Lightning uses a logged "step" as the x value of the metrics written with it: epoch-level
        # metrics then share the callbacks' axis (number of completed training epochs).
        if self._trainer is None or self.trainer.sanity_checking or not self.trainer.loggers:
            return
        fitting = self.trainer.state.fn == "fit"
        completed = self.current_epoch + (1 if fitting else 0)
        self.log("step", float(completed), on_step=False, on_epoch=True, logger=True)

    def on_train_epoch_end(self) -> None:
        self._log_epoch_axis()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_axis()

    def on_test_epoch_end(self) -> None:
        self._log_epoch_axis()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(
                self.model.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                weight_decay=hp.weight_decay,
            )
        # Imported lazily: the SGD path must not depend on the optim layer.
        from lightning_curvature.optim import NGD

        return NGD(
            self.model,
            lr=hp.lr,
            alpha=hp.alpha,
            eps=hp.eps,
            fisher_type=hp.fisher_type,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
        )

    def _monitor_attached(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return False
        return any(type(cb).__name__ == "OptimizerMonitor" for cb in trainer.callbacks)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._trainer is None or self._monitor_attached():
            return
        optimizer = self.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap LightningOptimizer
        stats = getattr(optimizer, "stats", None)
        if not isinstance(stats, dict):
            return
        for key in NGD_STAT_KEYS:
            value = stats.get(key)
            if value is None:
                continue
            value = float(value)
            if value == value and abs(value) != float("inf"):  # never log NaN / inf
                self.log(f"ngd/{key}", value, on_step=False, on_epoch=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.hparams.restore_optimizer_state:
            # Lightning restores zip(optimizers, states): empty lists leave the fresh optimizer.
            checkpoint["optimizer_states"] = []
            checkpoint["lr_schedulers"] = []
