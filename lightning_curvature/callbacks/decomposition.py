"""``HessianDecomposition``: spectra and traces of H, its Gauss–Newton part H₀ and H₁ = H − H₀."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_curvature import curvature
from lightning_curvature.checks import check_float, check_int
from lightning_curvature.curvature import BatchSet, SpectralDensity, module_mode

from .base import (
    CurvatureCallback,
    Measurement,
    MeasurementContext,
    MeasurementError,
    _measurement_model,
)
from .progress import CountingOperator

__all__ = ["HessianDecomposition"]

PREFIX = "curvature/decomposition"
FIGURE_TAG = "curvature/spectrum_decomposition"
#: (key of the engine result, tag suffix, label in the figure)
PARTS = (
    ("hessian", "h", "H"),
    ("gauss_newton", "ggn", "H₀ = GGN"),
    ("residual", "residual", "H₁ = H − H₀"),
)


class HessianDecomposition(CurvatureCallback):
    """Log seed 004's split ``H = H₀ + H₁`` during training: three spectra and three traces.

    ``H₀ = Jᵀ∇²ℓJ`` is the generalized Gauss–Newton matrix (positive semidefinite for a convex
    loss; Pennington & Bahri 2017 model it as Wishart), ``H₁ = H − H₀ = Σ_k (∂ℓ/∂f_k) ∇²f_k``
    the residual that carries the errors (modelled as Wigner). Per measurement
    :func:`~lightning_curvature.curvature.spectrum_decomposition` gives

    - ``curvature/spectrum_decomposition``: a figure with the SLQ densities of ``H``, ``H₀`` and
      ``H₁`` side by side (same start vectors, one eigenvalue axis, log density);
    - ``curvature/decomposition/trace_h``, ``…/trace_ggn``, ``…/trace_residual`` and their
      ``…_stderr``: Hutch++ traces on one sketch and one set of probes, so
      ``trace_h = trace_ggn + trace_residual`` to rounding
      (:func:`~lightning_curvature.curvature.decomposition.decomposition_traces`);
    - ``curvature/decomposition/index_h`` and ``…/index_residual``: the index (SLQ mass below
      ``−τ``, :meth:`~lightning_curvature.curvature.SpectralDensity.index`) of ``H`` and
      ``H₁`` (``H₀``'s is zero up to τ for a convex loss).

    ``H`` is the epoch's shared Hessian operator (:mod:`.shared`), so these describe the same
    Hessian as ``curvature/trace`` and ``curvature/lambda_max``; the Gauss–Newton operator is
    built here on the same measurement set.

    Cost per measurement: ``num_iters · num_runs`` products each of ``H`` and ``H₀`` for their
    spectra and as many of both for ``H₁``'s, plus ``trace_matvecs`` of ``H`` and about
    ``2/3 · trace_matvecs`` of ``H₀`` for the traces; with the defaults about 180 products
    (a GGN product costs about one Hessian-vector product). Not in
    :func:`~lightning_curvature.callbacks.default_callbacks` for that reason: add it when the
    random-matrix picture is the question.

    Parameters
    ----------
    num_iters : int
        Lanczos steps per SLQ run (``>= 2``). Default 30.
    num_runs : int
        SLQ runs (random start vectors, shared by the three parts). Default 1.
    trace_matvecs : int
        Products of ``H`` for the traces (``>= 4``). Default 30.
    num_points : int
        Grid points of each density (``>= 8``). Default 256.
    sigma : float, optional
        Broadening width of the picture (finite, > 0); default one width for the three
        panels, chosen by the engine from ``H``'s spectrum.
    every_n_epochs : int
        Default 10 (as :class:`~.spectrum.HessianSpectrum`).
    num_samples, batch_size, seed, loss_fn, eval_mode, measure_on_train_start, name
        See :class:`~lightning_curvature.callbacks.base.CurvatureCallback`.

    Notes
    -----
    The model's ``forward`` must return one tensor (the Gauss–Newton product differentiates the
    outputs); another output is refused at setup.
    """

    def __init__(
        self,
        *,
        num_iters: int = 30,
        num_runs: int = 1,
        trace_matvecs: int = 30,
        num_points: int = 256,
        sigma: float | None = None,
        every_n_epochs: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, **kwargs)
        self.num_iters: int = check_int("num_iters", num_iters, minimum=2)  # type: ignore[assignment]
        self.num_runs: int = check_int("num_runs", num_runs, minimum=1)  # type: ignore[assignment]
        self.trace_matvecs: int = check_int("trace_matvecs", trace_matvecs, minimum=4)  # type: ignore[assignment]
        self.num_points: int = check_int("num_points", num_points, minimum=8)  # type: ignore[assignment]
        self.sigma = check_float("sigma", sigma, low=0.0, low_open=True, allow_none=True)

    @override
    def memory_bytes(self, dim: int, num_samples: int) -> int:
        lanczos = 8 * dim * (self.num_iters + 2) * self.num_runs
        traces = 4 * 8 * dim * self.trace_matvecs  # sketch, Q, probes and two images
        return lanczos + traces + 3 * 8 * self.num_points * (self.num_iters * self.num_runs + 4)

    @override
    def _check_setup(self, pl_module: nn.Module, data: BatchSet) -> None:
        checked = self._checked
        super()._check_setup(pl_module, data)
        if checked:
            return
        inputs, _ = data.batches[0]
        # Eval mode whatever ``eval_mode``: a train-mode forward would update BatchNorm's
        # running statistics, and the output's type does not depend on the mode.
        model = _measurement_model(pl_module)
        with module_mode(model, True), torch.no_grad():
            out = model(inputs[:2])
        if not isinstance(out, Tensor):
            raise MeasurementError(
                f"{self.name}: the Gauss–Newton part differentiates the model's output, which "
                f"must be one tensor; forward() returned {type(out).__name__}"
            )

    @override
    def measure(self, ctx: MeasurementContext) -> Measurement:
        hessian = ctx.shared.hessian()
        ggn = curvature.GGNOperator(
            ctx.pl_module, ctx.loss_fn, ctx.data, eval_mode=ctx.eval_mode, reduce_fn=ctx.reduce_fn
        )
        products = 4 * self.num_iters * self.num_runs + self.trace_matvecs
        products += self.trace_matvecs - 2 * (self.trace_matvecs // 3)
        with ctx.progress("H = GGN + residual", products) as bar:
            dec = curvature.spectrum_decomposition(
                CountingOperator(hessian, bar),
                CountingOperator(ggn, bar),
                num_iters=self.num_iters,
                num_runs=self.num_runs,
                trace_matvecs=self.trace_matvecs,
                num_points=self.num_points,
                sigma=self.sigma,
                generator=ctx.generator,
            )
        scalars: dict[str, float] = {}
        for key, suffix, _ in PARTS:
            est = getattr(dec, f"trace_{key}")
            scalars[f"{PREFIX}/trace_{suffix}"] = est.value
            scalars[f"{PREFIX}/trace_{suffix}_stderr"] = est.stderr
        indices = dec.indices()
        scalars[f"{PREFIX}/index_h"] = indices["hessian"].value
        scalars[f"{PREFIX}/index_residual"] = indices["residual"].value
        result = Measurement(scalars=scalars)
        densities = [getattr(dec, key) for key, _, _ in PARTS]
        traces = [scalars[f"{PREFIX}/trace_{suffix}"] for _, suffix, _ in PARTS]
        if all(_finite(sd) for sd in densities):
            step = ctx.step
            result.figures[FIGURE_TAG] = lambda: decomposition_figure(densities, traces, step)
        return result


def _finite(sd: SpectralDensity) -> bool:
    return bool(np.isfinite(sd.nodes.numpy()).all() and np.isfinite(sd.weights.numpy()).all())


def broadened(sd: SpectralDensity, grid: np.ndarray, sigma: float) -> np.ndarray:
    """``(1/R) Σ_r Σ_j w_rj N(t; θ_rj, σ²)`` on ``grid`` (one width for every panel)."""
    nodes = sd.nodes.double().numpy().reshape(-1)
    weights = sd.weights.double().numpy().reshape(-1) / sd.nodes.shape[0]
    z = (grid[:, None] - nodes[None, :]) / sigma
    return (weights[None, :] * np.exp(-0.5 * z**2)).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))


def decomposition_figure(densities: list[SpectralDensity], traces: list[float], epoch: int) -> Any:
    """Three panels (H, H₀, H₁) on one eigenvalue axis and one broadening width, log density."""
    from matplotlib.figure import Figure

    nodes = np.concatenate([sd.nodes.double().numpy().reshape(-1) for sd in densities])
    low, high = float(nodes.min()), float(nodes.max())
    sigma = densities[0].sigma
    margin = max(6 * sigma, 0.02 * (high - low), 1e-12)
    grid = np.linspace(low - margin, high + margin, 512)
    fig = Figure(figsize=(11, 3.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    curves = [broadened(sd, grid, sigma) for sd in densities]
    peak = max(max(float(c.max()) for c in curves), 1e-300)
    for k, (ax, sd, curve, (_, _, label), trace) in enumerate(
        zip(axes, densities, curves, PARTS, traces, strict=True)
    ):
        ax.semilogy(grid, np.clip(curve, peak * 1e-12, None), color=f"C{k}")
        ax.axvline(0.0, color="0.5", lw=0.8, ls="--")
        index = sd.index().value
        ax.set_title(f"{label}\ntr = {trace:.4g}, index = {index:.3f}", fontsize=10)
        ax.set_xlabel("eigenvalue")
    axes[0].set_ylabel("density (SLQ, broadened)")
    # Seven decades: the outliers' mass (a few eigenvalues of d) stays visible beside the bulk.
    axes[0].set_ylim(peak * 1e-7, peak * 3)
    fig.suptitle(f"Hessian = Gauss–Newton + residual (seed 004), epoch {epoch}", fontsize=11)
    return fig
