"""Terminal progress for long measurements, in the style of the trainer's own progress bar.

A measurement is counted in units its engine performs (Hessian-vector products, SGLD chains,
loss-grid rows). With Lightning's ``TQDMProgressBar`` a transient tqdm bar with the same format
appears below the training bar; with ``RichProgressBar`` a task is added to its live display; with
no progress bar, a disabled one, or on a rank other than zero, nothing is printed.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor

from lightning_curvature.curvature.operators import CurvatureOperator, OperatorLike, as_operator

__all__ = ["CountingOperator", "MeasurementProgress"]


class MeasurementProgress:
    """A progress counter tied to the trainer's progress bar (no-op when there is none)."""

    def __init__(self, trainer: Any, description: str, total: int | None) -> None:
        self._bar: Any = None
        self._rich: Any = None
        self._task: Any = None
        pb = getattr(trainer, "progress_bar_callback", None)
        if pb is None or not getattr(pb, "is_enabled", False):
            return
        if not getattr(trainer, "is_global_zero", True):
            return
        rich_progress = getattr(pb, "progress", None)
        if rich_progress is not None and hasattr(rich_progress, "add_task"):
            self._rich = rich_progress
            self._task = rich_progress.add_task(f"[cyan]{description}", total=total)
            return
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, TQDMProgressBar

        bar_format = getattr(pb, "BAR_FORMAT", TQDMProgressBar.BAR_FORMAT)
        position = 2 * int(getattr(pb, "process_position", 0)) + 1
        self._bar = Tqdm(
            desc=description,
            total=total,
            position=position,
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=bar_format,
        )

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
        elif self._rich is not None:
            self._rich.update(self._task, advance=n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._rich is not None:
            self._rich.remove_task(self._task)
            self._rich = None

    def __enter__(self) -> MeasurementProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CountingOperator(CurvatureOperator):
    """An operator that forwards every product to ``op`` and reports it to ``progress``.

    Built on the engine's operator base, so the estimators take it like any operator; it has
    the wrapped operator's ``dim``, ``dtype``, ``device`` and ``layout`` (per-parameter blocks),
    and ``num_matvecs`` counts the products taken through it. The wrapped operator stays
    reachable as :attr:`op`. This gives progress in Hessian-vector products without the engine
    knowing about terminals.
    """

    def __init__(self, op: OperatorLike, progress: MeasurementProgress) -> None:
        base = as_operator(op)
        super().__init__(base.dim, base.dtype, base.device, base.layout)
        self.op = op
        self._base = base
        self.progress = progress

    def _matmat(self, matrix: Tensor) -> Tensor:
        out = self._base.matmat(matrix)
        self.progress.update(int(matrix.shape[1]))
        return out
