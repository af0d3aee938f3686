"""``HessianEigenvalues``: λ_max and λ_min of H by Lanczos, warm-started from last epoch."""

from __future__ import annotations

from typing import Any

import torch

from lightning_curvature import curvature

from .base import CurvatureCallback, Measurement, MeasurementContext, check_float, check_int
from .progress import CountingOperator

__all__ = ["HessianEigenvalues"]


class HessianEigenvalues(CurvatureCallback):
    """Log ``curvature/lambda_max`` and ``curvature/lambda_min`` (both ends from one Lanczos run).

    Lanczos on Hessian-vector products (Lanczos 1950; Ghorbani, Krishnan & Xiao 2019) converges
    to both extreme eigenvalues of the Krylov space. The start vector is last epoch's
    ``(v_max, v_min)`` (kept in ``state_dict``), so a slowly changing Hessian needs few
    iterations. Also logged: ``curvature/lambda_max_residual`` and
    ``curvature/lambda_min_residual`` (``‖Hv − λv‖``, the accuracy actually reached).

    Parameters
    ----------
    max_iters : int
        Lanczos iterations at most (one HVP each). Default 20: about 20% of an epoch per
        measurement; λ_max converges to a relative residual ~1e-5, λ_min (small, inside the
        bulk) to ~2e-2 while its value agrees with a 100-iteration run to 0.2%.
    tol : float
        Relative residual at which Lanczos stops early. Default 1e-3.
    every_n_epochs : int
        Default 2 (about 10% of an epoch amortized).
    num_samples, batch_size, seed, loss_fn, eval_mode, measure_on_train_start
        See :class:`~lightning_curvature.callbacks.base.CurvatureCallback`.

    Notes
    -----
    Measured costs are for an MLP 784-256-256-10 on one CPU thread, relative to one
    Fashion-MNIST training epoch at batch 128 (``benchmarks/overhead.py``,
    ``docs/benchmarks.md``).
    """

    def __init__(
        self, *, max_iters: int = 20, tol: float = 1e-3, every_n_epochs: int = 2, **kwargs: Any
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, **kwargs)
        self.max_iters = check_int("max_iters", max_iters, 2)
        self.tol = check_float("tol", tol, low=0.0, high=1.0, low_open=True)
        self._warm_start: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_state(self) -> dict[str, Any]:
        return {"warm_start": self._warm_start}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._warm_start = state.get("warm_start")

    def measure(self, ctx: MeasurementContext) -> Measurement:
        op = curvature.HessianOperator(
            ctx.pl_module, ctx.loss_fn, ctx.data, eval_mode=ctx.eval_mode, reduce_fn=ctx.reduce_fn
        )
        v0 = None
        if self._warm_start is not None and all(v.numel() == op.dim for v in self._warm_start):
            v0 = [v.to(device=op.device, dtype=op.dtype) for v in self._warm_start]
        with ctx.progress("Lanczos eigenvalues", self.max_iters) as bar:
            eig = curvature.extreme_eigenpairs(
                CountingOperator(op, bar),
                max_iters=self.max_iters,
                tol=self.tol,
                generator=ctx.generator,
                v0=v0,
            )
        if torch.isfinite(eig.v_max).all() and torch.isfinite(eig.v_min).all():
            self._warm_start = (eig.v_max.detach().cpu(), eig.v_min.detach().cpu())
        return Measurement(
            scalars={
                "curvature/lambda_max": float(eig.lambda_max),
                "curvature/lambda_min": float(eig.lambda_min),
                "curvature/lambda_max_residual": float(eig.residual_max),
                "curvature/lambda_min_residual": float(eig.residual_min),
            }
        )
