"""``OptimizerMonitor``: per-epoch means of the update norm and, for NGD, of κ and tr F."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_curvature.checks import check_int

from .sink import MetricSink

__all__ = ["OptimizerMonitor"]

_STAT_TAGS = {"kappa": "ngd/kappa", "fisher_trace": "ngd/fisher_trace"}


class OptimizerMonitor(Callback):
    """Log ``optim/update_norm`` (any optimizer) and ``ngd/kappa``, ``ngd/fisher_trace`` (NGD).

    ``optim/update_norm`` is the mean over the epoch's optimizer steps of
    ``‖θ_{t+1} − θ_t‖₂`` over all trainable parameters.

    - An optimizer that reports ``stats["update_norm"]`` after each step
      (``lightning_curvature.optim.NGD``, which computes it while applying the update) is read
      at every step, at no cost.
    - For any other optimizer the parameters are copied just before the step
      (``on_before_optimizer_step``, into buffers allocated once) and the norm of the difference
      is taken after the batch. Cost per measured step: one copy and one in-place subtraction of
      the parameters and one norm per tensor (fused ``_foreach`` kernels), nothing else: the
      list of trainable parameters is read once per epoch (at its first optimizer step, after
      every ``on_train_epoch_start`` hook, so a callback that unfreezes layers there is seen),
      and the per-tensor norms stay on the device until the epoch's end (one synchronization
      per epoch, not one per step). Hence ``every_n_steps``: the epoch mean is estimated from
      every ``every_n_steps``-th optimizer step (an unbiased estimate of the mean over all
      steps; 1 = exact). Batches without a step (gradient accumulation) are never counted.

    With ``stats``, the epoch means of ``stats["kappa"]`` (damping κ) and
    ``stats["fisher_trace"]`` (tr F) are logged as ``ngd/kappa`` and ``ngd/fisher_trace``. Values
    are logged at the epoch's end, x-axis = completed epochs, like every other curvature tag.
    Nothing about training changes: the callback only reads parameters and ``stats``.

    Parameters
    ----------
    every_n_steps : int
        Copy-based measurement on every ``every_n_steps``-th optimizer step. Default 8.
    """

    def __init__(self, every_n_steps: int = 8) -> None:
        super().__init__()
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self._buffers: list[Tensor] | None = None
        self._params_cache: list[Tensor] | None = None
        self._devices = 1
        #: Per-tensor norms of each measured step, kept on the device until the epoch's end.
        self._pending: list[Tensor] = []
        self._copied = False
        self._stepped = False
        self._steps = 0
        self._optimizer: Any = None
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._steps = 0
        self._pending = []
        self._params_cache = None

    def _add(self, tag: str, value: float) -> None:
        if math.isfinite(value):
            self._sums[tag] = self._sums.get(tag, 0.0) + value
            self._counts[tag] = self._counts.get(tag, 0) + 1

    @staticmethod
    def _params(pl_module: Any) -> list[Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    @staticmethod
    def _stats(optimizer: Any) -> dict | None:
        stats = getattr(getattr(optimizer, "optimizer", optimizer), "stats", None)
        return stats if isinstance(stats, dict) else None

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        # Runs after backward, before the parameters move (θ_t).
        self._stepped, self._optimizer = True, optimizer
        stats = self._stats(optimizer)
        reports_norm = stats is not None and "update_norm" in stats
        self._copied = not reports_norm and self._steps % self.every_n_steps == 0
        self._steps += 1
        if not self._copied:
            return
        params = self._params_cache
        if params is None:
            # Once per epoch (see the class docstring): walking the module tree and checking the
            # buffers at every measured step cost as much as the copy itself.
            params = self._params_cache = self._params(pl_module)
            self._devices = len({p.device for p in params})
            if (
                self._buffers is None
                or len(self._buffers) != len(params)
                or any(
                    b.shape != p.shape or b.device != p.device or b.dtype != p.dtype
                    for b, p in zip(self._buffers, params, strict=True)
                )
            ):
                self._buffers = [torch.empty_like(p, requires_grad=False) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._buffers, params)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if not self._stepped:
            return
        self._stepped = False
        stats = self._stats(self._optimizer)
        if stats is not None and stats.get("update_norm") is not None:
            self._add("optim/update_norm", float(stats["update_norm"]))
        elif self._copied and self._buffers is not None and self._params_cache is not None:
            with torch.no_grad():
                # In place: buffers become θ_t − θ_{t+1}; no allocation beyond per-tensor norms,
                # which stay on the device (read at the epoch's end, _flush).
                torch._foreach_sub_(self._buffers, self._params_cache)
                norms = torch._foreach_norm(self._buffers)
                if self._devices > 1:  # model parallel: gather the norms on one device
                    norms = [n.to(norms[0].device) for n in norms]
                # stack promotes mixed float dtypes to the widest one, exactly.
                self._pending.append(torch.stack(norms))
        self._copied = False
        if stats is not None:
            for key, tag in _STAT_TAGS.items():
                if stats.get(key) is not None:
                    self._add(tag, float(stats[key]))

    def _flush(self) -> None:
        """Add the pending per-step norms: ``‖Δθ‖ = sqrt(Σ_k ‖Δθ_k‖²)`` over the tensors ``k``.

        One device-to-host copy for the whole epoch; the sum is taken in Python floats in tensor
        order, exactly as when each step was read at once.
        """
        if not self._pending:
            return
        rows = torch.stack(self._pending).tolist()
        self._pending = []
        for norms in rows:
            self._add("optim/update_norm", math.sqrt(sum(float(n) ** 2 for n in norms)))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush()
        means = {tag: self._sums[tag] / self._counts[tag] for tag in self._sums}
        if means:
            MetricSink(trainer, pl_module, trainer.current_epoch + 1).scalars(means)
        self._reset()
