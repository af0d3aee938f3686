"""``HessianEigenvalues``: λ_max and λ_min of H by Lanczos, warm-started from last measurement."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_curvature.checks import check_float, check_int

from .base import CurvatureCallback, Measurement, MeasurementContext
from .progress import CountingOperator
from .warm_start import SharedLanczosReader

__all__ = ["HessianEigenvalues"]


class HessianEigenvalues(SharedLanczosReader, CurvatureCallback):
    """Log ``curvature/lambda_max`` and ``curvature/lambda_min`` (both ends from one Lanczos run).

    Lanczos on Hessian-vector products (Lanczos 1950; Ghorbani, Krishnan & Xiao 2019) converges
    to both extreme eigenvalues of the Krylov space. The run is the epoch's shared one
    (:mod:`.shared`): the same Ritz vectors are ``LossProjection``'s Hessian directions and the
    same basis deflates ``HessianTrace``. Its start vector is last measurement's
    ``(v_max, v_min)`` (kept in ``state_dict``), so a slowly changing Hessian needs few
    iterations. Also logged: ``diagnostics/curvature/lambda_max_residual`` and
    ``diagnostics/curvature/lambda_min_residual`` (``‖Hv − λv‖`` from explicit products, the
    accuracy actually reached).

    Parameters
    ----------
    max_iters : int
        Lanczos steps (one HVP each, plus two for the residuals). Default 20: λ_max converges to
        a relative residual ~1e-5, λ_min (small, inside the bulk) to ~2e-2 while its value agrees
        with a 100-iteration run to 0.2%.
    tol : float
        Relative residual below which the pair counts as converged
        (``diagnostics/curvature/eigenpairs_converged``). Default 1e-3.
    every_n_epochs : int
        Default 2.
    num_samples, batch_size, seed, loss_fn, eval_mode, measure_on_train_start, name
        See :class:`~lightning_curvature.callbacks.base.CurvatureCallback`.
    """

    def __init__(
        self, *, max_iters: int = 20, tol: float = 1e-3, every_n_epochs: int = 2, **kwargs: Any
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, **kwargs)
        self.max_iters: int = check_int("max_iters", max_iters, minimum=2)  # type: ignore[assignment]
        self.tol: float = check_float("tol", tol, low=0.0, high=1.0, low_open=True)  # type: ignore[assignment]
        self._init_lanczos_reader()

    @override
    def memory_bytes(self, dim: int, num_samples: int) -> int:
        return 8 * dim * (self.max_iters + 4)

    @override
    def measure(self, ctx: MeasurementContext) -> Measurement:
        with ctx.progress("Lanczos eigenvalues", self.max_iters + 2) as bar:
            eig = ctx.shared.krylov(lambda op: CountingOperator(op, bar)).eigenpairs
        return Measurement(
            scalars={
                "curvature/lambda_max": eig.lambda_max,
                "curvature/lambda_min": eig.lambda_min,
                "diagnostics/curvature/lambda_max_residual": eig.residual_max,
                "diagnostics/curvature/lambda_min_residual": eig.residual_min,
                "diagnostics/curvature/eigenpairs_converged": float(eig.converged),
            }
        )
