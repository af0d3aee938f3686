"""``OptimizerMonitor``: per-epoch means of the update norm and, for NGD, of κ and tr F."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor

from .sink import MetricSink

__all__ = ["OptimizerMonitor"]

_STAT_TAGS = {"kappa": "ngd/kappa", "fisher_trace": "ngd/fisher_trace"}


class OptimizerMonitor(Callback):
    """Log ``optim/update_norm`` (any optimizer) and ``ngd/kappa``, ``ngd/fisher_trace`` (NGD).

    ``optim/update_norm`` is the mean over the epoch's optimizer steps of
    ``‖θ_{t+1} − θ_t‖₂`` over all trainable parameters, measured the same way for every
    optimizer: just before each step (``on_before_optimizer_step``) the parameters are copied
    into buffers allocated once, and after the batch the norm of the difference is accumulated.
    Cost per step: one copy and one in-place subtraction of the parameters (fused ``_foreach``
    kernels; one extra parameter-sized buffer of memory); nothing is copied on batches without
    a step (gradient accumulation).

    For an optimizer with a ``stats`` dict after each step (``lightning_curvature.optim.NGD``),
    the epoch means of ``stats["kappa"]`` (the damping κ) and ``stats["fisher_trace"]`` (tr F)
    are logged as ``ngd/kappa`` and ``ngd/fisher_trace``. Values are logged at the epoch's end,
    x-axis = completed epochs, like every other curvature tag. Nothing about training changes:
    the callback only reads parameters and ``stats``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._buffers: list[Tensor] | None = None
        self._pending = False
        self._optimizer: Any = None
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def _add(self, tag: str, value: float) -> None:
        if math.isfinite(value):
            self._sums[tag] = self._sums.get(tag, 0.0) + value
            self._counts[tag] = self._counts.get(tag, 0) + 1

    @staticmethod
    def _params(pl_module: Any) -> list[Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # Runs after backward, before the parameters move: copy θ_t into buffers allocated once.
        params = self._params(pl_module)
        with torch.no_grad():
            if (
                self._buffers is None
                or len(self._buffers) != len(params)
                or any(
                    b.shape != p.shape or b.device != p.device or b.dtype != p.dtype
                    for b, p in zip(self._buffers, params, strict=True)
                )
            ):
                self._buffers = [torch.empty_like(p) for p in params]
            torch._foreach_copy_(self._buffers, [p.detach() for p in params])
        self._pending = True
        self._optimizer = optimizer

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        if not self._pending or self._buffers is None:
            return
        self._pending = False
        with torch.no_grad():
            # In place: buffers become θ_t − θ_{t+1}; one fused kernel per list, no allocation
            # beyond the per-tensor norms.
            torch._foreach_sub_(self._buffers, [p.detach() for p in self._params(pl_module)])
            norm = math.sqrt(sum(float(n) ** 2 for n in torch._foreach_norm(self._buffers)))
        self._add("optim/update_norm", norm)
        stats = getattr(self._optimizer, "stats", None)
        if isinstance(stats, dict):
            for key, tag in _STAT_TAGS.items():
                if key in stats and stats[key] is not None:
                    self._add(tag, float(stats[key]))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        means = {tag: self._sums[tag] / self._counts[tag] for tag in self._sums}
        if means:
            MetricSink(trainer, pl_module, trainer.current_epoch + 1).scalars(means)
        self._reset()
