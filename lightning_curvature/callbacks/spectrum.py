"""``HessianSpectrum``: the spectral density of H by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

from typing import Any

import numpy as np
from typing_extensions import override

from lightning_curvature import curvature
from lightning_curvature.checks import check_float, check_int

from .base import CurvatureCallback, Measurement, MeasurementContext
from .progress import CountingOperator

__all__ = ["HessianSpectrum"]


class HessianSpectrum(CurvatureCallback):
    """Log ``curvature/negative_fraction`` and the density ``curvature/spectrum``.

    SLQ (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019): ``num_runs`` Lanczos runs of
    ``num_iters`` steps from random unit vectors give Ritz values θ and weights τ; the density is
    ``φ(t) ≈ (1/runs) Σ_runs Σ_k w_k g_σ(t − θ_k)``. ``curvature/negative_fraction`` is the
    Hessian index: the quadrature mass of the (unbroadened) Ritz values below ``−τ``,
    ``(1/runs) Σ_runs Σ_k w_k [θ_k < −τ]``, where the resolution τ is derived from the Lanczos run
    (the largest residual of a node whose sign the run leaves open; see
    :meth:`~lightning_curvature.curvature.SpectralDensity.index`) and logged as
    ``curvature/negative_fraction_tau``. The broadened density is for the picture only.
    ``curvature/spectrum`` is a figure (density on a log scale) and
    ``curvature/spectrum_histogram`` a TensorBoard histogram (expected eigenvalue counts per bin).

    Parameters
    ----------
    num_iters : int
        Lanczos steps per run (one HVP each). Default 30.
    num_runs : int
        Independent runs (random start vectors). Default 1: cost ``num_iters · num_runs`` HVPs,
        about 17% of an epoch per measurement.
    num_points : int
        Grid points of the density. Default 256.
    sigma : float, optional
        Gaussian smoothing width (finite, > 0); default chosen by the engine from the spectrum's
        range.
    every_n_epochs : int
        Default 10 (about 1.7% of an epoch amortized; the density changes slowly, and 10 is a
        multiple of the other curvature cadences).
    num_samples, batch_size, seed, loss_fn, eval_mode, measure_on_train_start, name
        See :class:`~lightning_curvature.callbacks.base.CurvatureCallback`.

    Notes
    -----
    In an over-parametrized network most eigenvalues sit at ~0; the Gaussian broadening of the
    picture puts half of that bulk below zero (mass of the broadened density below 0 reads ≈ 0.5
    whatever the landscape), which is why the index counts unbroadened nodes below −τ. With
    ``num_runs >= 2`` its standard error over runs is logged as
    ``curvature/negative_fraction_stderr``. The runs use the epoch's shared Hessian
    operator (:mod:`.shared`), so the spectrum describes the same Hessian as the trace and the
    extreme eigenvalues; SLQ needs random start vectors, so its Lanczos runs are its own.
    Measured costs are for an MLP 784-256-256-10 on one CPU thread, relative to one
    Fashion-MNIST training epoch at batch 128 (``benchmarks/overhead.py``,
    ``docs/benchmarks.md``).
    """

    def __init__(
        self,
        *,
        num_iters: int = 30,
        num_runs: int = 1,
        num_points: int = 256,
        sigma: float | None = None,
        every_n_epochs: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, **kwargs)
        self.num_iters: int = check_int("num_iters", num_iters, minimum=2)  # type: ignore[assignment]
        self.num_runs: int = check_int("num_runs", num_runs, minimum=1)  # type: ignore[assignment]
        self.num_points: int = check_int("num_points", num_points, minimum=8)  # type: ignore[assignment]
        self.sigma = check_float("sigma", sigma, low=0.0, low_open=True, allow_none=True)

    @override
    def memory_bytes(self, dim: int, num_samples: int) -> int:
        nodes = self.num_iters * self.num_runs
        return 8 * dim * (self.num_iters + 2) + 8 * self.num_points * (nodes + 4)

    @override
    def measure(self, ctx: MeasurementContext) -> Measurement:
        op = ctx.shared.hessian()
        with ctx.progress("SLQ spectrum", self.num_iters * self.num_runs) as bar:
            sd = curvature.spectral_density(
                CountingOperator(op, bar),
                num_iters=self.num_iters,
                num_runs=self.num_runs,
                num_points=self.num_points,
                sigma=self.sigma,
                generator=ctx.generator,
            )
        grid = sd.grid.detach().cpu().double().numpy()
        density = sd.density.detach().cpu().double().numpy()
        index = sd.index()
        scalars = {
            "curvature/negative_fraction": index.value,
            "curvature/negative_fraction_tau": index.tau,
        }
        if np.isfinite(index.stderr):
            scalars["curvature/negative_fraction_stderr"] = index.stderr
        result = Measurement(scalars=scalars)
        if np.all(np.isfinite(grid)) and np.all(np.isfinite(density)) and len(grid) > 1:
            width = np.gradient(grid)
            counts = np.clip(density, 0.0, None) * width * op.dim
            result.histograms["curvature/spectrum_histogram"] = (grid + width / 2, counts)
            result.figures["curvature/spectrum"] = lambda: _density_figure(grid, density, ctx.step)
        return result


def _density_figure(grid: np.ndarray, density: np.ndarray, epoch: int) -> Any:
    from matplotlib import ticker
    from matplotlib.figure import Figure

    # A fixed layout: the constrained-layout pass was about half of a measurement's drawing.
    fig = Figure(figsize=(6, 3.6), dpi=100)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.15, top=0.9)
    ax = fig.add_subplot()
    floor = max(float(density.max()) * 1e-8, 1e-30) if density.size else 1e-30
    ax.semilogy(grid, np.clip(density, floor, None), color="C0")
    # Plain "1e-05" labels at most 7 decades, no minor ticks: the default 10^x labels go
    # through mathtext, and the minor ticks of a many-decade log axis (a few hundred tick
    # artists) were most of this figure's drawing time.
    ax.yaxis.set_major_locator(ticker.LogLocator(numticks=7))
    ax.yaxis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=True))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.axvline(0.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian spectral density (SLQ), epoch {epoch}")
    return fig
