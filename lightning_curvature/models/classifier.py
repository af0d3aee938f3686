"""A LightningModule that trains any image classifier with SGD or a natural-gradient optimizer."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_curvature.callbacks.sink import MetricSink
from lightning_curvature.checks import (
    ArgumentError,
    check_bool,
    check_choice,
    check_float,
    check_int,
)

__all__ = ["ImageClassifier"]

_OPTIMIZERS = ("sgd", "ngd", "online_ngd")
_FISHER_TYPES = ("empirical", "true")
_DAMPINGS = ("per_parameter", "per_sample")
_STAGES = ("train", "val", "test")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier trained with SGD, the exact NGD or Kaldi's online NGD.

    Logs ``train/loss``, ``train/acc`` (epoch means), ``val/loss``, ``val/acc``, ``test/loss``,
    ``test/acc`` with x-axis = completed training epochs, like the curvature callbacks (written
    to the loggers at that step, and to ``trainer.callback_metrics`` for checkpoint/early-stopping
    monitors). No metric named ``step`` is logged (a logged ``step`` would replace the global step
    in checkpoint names such as ``epoch=4-step=5``). Optimizer statistics (``optim/update_norm``,
    ``ngd/kappa``, ``ngd/fisher_trace``) are the job of
    :class:`~lightning_curvature.callbacks.OptimizerMonitor`, which reads ``optimizer.stats``;
    the module logs none itself.

    Parameters
    ----------
    model : nn.Module
        Maps images to logits (e.g. :class:`~lightning_curvature.models.MLP`); from YAML as
        ``class_path``/``init_args``.
    optimizer : {"sgd", "ngd", "online_ngd"}
        ``torch.optim.SGD``; :class:`lightning_curvature.optim.NGD` (exact minibatch NGD,
        κ = α·max(tr F, ε)/d over all d parameters); or
        :class:`lightning_curvature.optim.OnlineNGD` (Kaldi's online NG-SGD, the method seed 002
        used: per-axis factors, κ = α·tr F/D per factor, ε the eigenvalue floor).
    lr, momentum, weight_decay : float
        Shared by all optimizers (OnlineNGD adds the L2 term to the gradient before
        preconditioning, NGD decays the weights decoupled).
    alpha, eps : float
        NGD and OnlineNGD: the smoothing α and the floor ε (see the optimizers).
    fisher_type : {"empirical", "true"}
        NGD only.
    damping : {"per_parameter", "per_sample"}
        NGD only: κ = α·max(tr F, ε)/d (the formula as published, nearly undamped when the
        batch is much smaller than d) or κ = α·max(tr F, ε)/N with N the number of
        pseudo-samples (α times the mean nonzero eigenvalue of F: α keeps its meaning). The
        documented working setting is ``damping="per_sample", alpha=1, lr=0.1`` (``docs/ngd.md``).
    rescale : bool
        NGD only: rescale each update to the raw gradient's norm (as the online NGD does).
    rank, update_period, eta :
        OnlineNGD only: largest factor rank (an axis of size D gets min((D+1)//2, rank)), factor
        update period in steps, forgetting factor η.
    num_classes : int, optional
        For the accuracy metrics; default ``model.num_classes`` if it exists, else 10.
    restore_optimizer_state : bool
        When resuming from a checkpoint, also restore the optimizer's state. ``False`` starts a
        fresh optimizer from the restored weights and loop counters (how ``split`` branches switch
        optimizer).
    """

    #: ``forward(x)`` is exactly ``self.model(x)``: landscape grids may evaluate ``model``
    #: directly (:func:`~lightning_curvature.landscape.stem.find_linear_stem`).
    forward_module = "model"

    def __init__(
        self,
        model: nn.Module,
        optimizer: Literal["sgd", "ngd", "online_ngd"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        alpha: float = 0.01,
        eps: float = 1e-10,
        fisher_type: Literal["empirical", "true"] = "empirical",
        weight_decay: float = 0.0,
        num_classes: int | None = None,
        restore_optimizer_state: bool = True,
        damping: Literal["per_parameter", "per_sample"] = "per_parameter",
        rescale: bool = False,
        rank: int = 80,
        update_period: int = 4,
        eta: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        check_choice("optimizer", optimizer, _OPTIMIZERS)
        check_choice("fisher_type", fisher_type, _FISHER_TYPES)
        check_choice("damping", damping, _DAMPINGS)
        check_bool("rescale", rescale)
        check_float("lr", lr, low=0.0, low_open=True)
        check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
        check_float("alpha", alpha, low=0.0, low_open=True)
        check_float("eps", eps, low=0.0, low_open=True)
        check_float("weight_decay", weight_decay, low=0.0)
        check_int("rank", rank, minimum=1)
        check_int("update_period", update_period, minimum=1)
        check_float("eta", eta, low=0.0, high=1.0, low_open=True, high_open=True)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()
        if num_classes is None:
            num_classes = int(getattr(model, "num_classes", 10))
        check_int("num_classes", num_classes, minimum=2)
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # Sample-weighted epoch means of the loss, synchronized across ranks by torchmetrics.
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        getattr(self, f"{stage}_acc").update(logits.detach(), y)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=y.shape[0])
        if stage == "train":
            # Live value for the progress bar only; loggers get the epoch means.
            self.log("loss", loss, on_step=True, on_epoch=False, prog_bar=True, logger=False)
        return loss

    def _log_epoch(self, stage: str) -> None:
        """Epoch means of ``stage``'s loss and accuracy at x = completed training epochs."""
        loss_metric, acc_metric = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        if self._trainer is None or self.trainer.sanity_checking:
            loss_metric.reset()
            acc_metric.reset()
            return
        if loss_metric.update_count == 0:
            return
        values = {
            f"{stage}/loss": float(loss_metric.compute()),
            f"{stage}/acc": float(acc_metric.compute()),
        }
        loss_metric.reset()
        acc_metric.reset()
        completed = self.current_epoch + (1 if self.trainer.state.fn == "fit" else 0)
        MetricSink(self.trainer, self, completed).scalars(values)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

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
        if hp.optimizer == "online_ngd":
            from lightning_curvature.optim import OnlineNGD

            return OnlineNGD(
                self.model.parameters(),
                lr=hp.lr,
                alpha=hp.alpha,
                eps=hp.eps,
                rank=hp.rank,
                update_period=hp.update_period,
                eta=hp.eta,
                momentum=hp.momentum,
                weight_decay=hp.weight_decay,
            )
        from lightning_curvature.optim import NGD

        return NGD(
            self.model,
            lr=hp.lr,
            alpha=hp.alpha,
            eps=hp.eps,
            fisher_type=hp.fisher_type,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            damping=hp.damping,
            rescale=hp.rescale,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.hparams.restore_optimizer_state:
            # Lightning restores zip(optimizers, states): empty lists leave the fresh optimizer.
            checkpoint["optimizer_states"] = []
            checkpoint["lr_schedulers"] = []
