"""``HessianTrace``: tr H of the training loss on the measurement set, by Hutch++, each epoch."""

from __future__ import annotations

from typing import Any

from lightning_curvature import curvature

from .base import CurvatureCallback, Measurement, MeasurementContext, check_int
from .progress import CountingOperator

__all__ = ["HessianTrace"]


class HessianTrace(CurvatureCallback):
    """Log ``curvature/trace`` and ``curvature/trace_stderr`` (Hutch++ on Hessian-vector products).

    Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace
    Estimation") spends a third of its ``num_matvecs`` HVPs on a sketch ``Q`` of the dominant
    subspace, takes ``tr(QᵀHQ)`` exactly, and estimates the remainder with Hutchinson probes
    projected off ``Q``: ``tr H ≈ tr(QᵀHQ) + (1/m) Σ gᵢᵀ(I−QQᵀ)H(I−QQᵀ)gᵢ``.
    Also logged: ``curvature/trace_lower`` / ``curvature/trace_upper`` (value ∓ stderr, for the
    dashboard's margin chart).

    Parameters
    ----------
    num_matvecs : int
        HVP budget per measurement (>= 4). Cost: ``num_matvecs`` HVPs, each about four training
        steps' worth of compute on the 256 default measurement samples. Default 30 (every
        epoch): about 15% of an epoch, for a standard error of about 6% of tr H (5x the budget
        brings it to 2%). The logged stderr says what the budget buys.
    num_samples, batch_size, every_n_epochs, seed, loss_fn, eval_mode, measure_on_train_start
        See :class:`~lightning_curvature.callbacks.base.CurvatureCallback`.

    Notes
    -----
    Measured costs are for an MLP 784-256-256-10 on one CPU thread, relative to one
    Fashion-MNIST training epoch at batch 128 (``benchmarks/overhead.py``,
    ``docs/benchmarks.md``).
    """

    def __init__(self, *, num_matvecs: int = 30, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_matvecs = check_int("num_matvecs", num_matvecs, 4)

    def measure(self, ctx: MeasurementContext) -> Measurement:
        op = curvature.HessianOperator(
            ctx.pl_module, ctx.loss_fn, ctx.data, eval_mode=ctx.eval_mode, reduce_fn=ctx.reduce_fn
        )
        with ctx.progress("Hutch++ trace", self.num_matvecs) as bar:
            est = curvature.hutchpp_trace(
                CountingOperator(op, bar), num_matvecs=self.num_matvecs, generator=ctx.generator
            )
        value, stderr = float(est.value), float(est.stderr)
        return Measurement(
            scalars={
                "curvature/trace": value,
                "curvature/trace_stderr": stderr,
                "curvature/trace_lower": value - stderr,
                "curvature/trace_upper": value + stderr,
            }
        )
