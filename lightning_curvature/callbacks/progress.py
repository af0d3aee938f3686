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


class CountingOperator:
    """A duck-typed linear operator that forwards to ``op`` and reports each product.

    The engine's estimators accept any object with ``dim``, ``matvec`` and optionally ``matmat``,
    ``dtype``, ``device``; wrapping the Hessian operator this way gives progress in
    Hessian-vector products without the engine knowing about terminals.
    """

    def __init__(self, op: Any, progress: MeasurementProgress) -> None:
        self.op = op
        self.progress = progress
        self.dim = op.dim
        if hasattr(op, "matmat"):
            self.matmat = self._matmat

    def __getattr__(self, name: str) -> Any:
        # dtype, device, layout, num_matvecs, ...: whatever the wrapped operator offers.
        if name in ("op", "progress"):
            raise AttributeError(name)
        return getattr(self.op, name)

    def matvec(self, v: Tensor) -> Tensor:
        out = self.op.matvec(v)
        self.progress.update(1)
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.op.matmat(V)
        self.progress.update(int(V.shape[-1]) if V.dim() > 1 else 1)
        return out

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matvec(x) if x.dim() == 1 else self._matmat(x)
