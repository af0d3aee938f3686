"""The random-matrix view of the Hessian: ``H = H₀ + H₁`` (seed 004).

For a loss ``ℓ(f(θ))`` of the network outputs ``f``,
``H = Jᵀ ∇²ℓ J + Σ_k (∂ℓ/∂f_k) ∇²f_k = H₀ + H₁``: the Gauss–Newton part ``H₀`` (positive
semidefinite for convex ``ℓ``; the :class:`~lightning_curvature.curvature.GGNOperator`) and the
residual ``H₁``, which carries the errors ``∂ℓ/∂f`` and vanishes at an interpolating minimum.
Pennington & Bahri (*Geometry of neural network loss surfaces via random matrix theory*, ICML
2017) model ``H₀`` as a Wishart and ``H₁`` as a Wigner matrix; their free sum predicts the
spectrum of ``H`` and an index that grows like ``|ε − ε_c|^{3/2}`` with the loss ``ε``.
:func:`spectrum_decomposition` measures the three spectra and traces during training; ``H₁`` is
the operator composition ``H − H₀`` (each of its products costs one ``H`` and one ``H₀``
product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from .density import spectral_density
from .operators import CurvatureOperator
from .probes import as_generator
from .results import SpectralDensity, SpectralIndex, TraceEstimate
from .trace import hutchpp_trace

__all__ = ["SpectrumDecomposition", "spectrum_decomposition"]


@dataclass(frozen=True)
class SpectrumDecomposition:
    """Spectra and traces of ``H``, its Gauss–Newton part ``H₀`` and the residual ``H₁ = H − H₀``.

    Attributes
    ----------
    hessian, gauss_newton, residual : SpectralDensity
        SLQ densities of ``H``, ``H₀``, ``H₁`` (same start vectors for the three).
    trace_hessian, trace_gauss_newton, trace_residual : TraceEstimate
        Hutch++ traces (same probes for the three; by linearity of the Hutchinson part they
        nearly add up, exactly so only for the same sketch).
    """

    hessian: SpectralDensity
    gauss_newton: SpectralDensity
    residual: SpectralDensity
    trace_hessian: TraceEstimate
    trace_gauss_newton: TraceEstimate
    trace_residual: TraceEstimate

    def indices(self) -> dict[str, SpectralIndex]:
        """The index (mass below ``−τ``) of each part; ``H₀``'s is 0 up to ``τ`` when PSD."""
        return {
            "hessian": self.hessian.index(),
            "gauss_newton": self.gauss_newton.index(),
            "residual": self.residual.index(),
        }

    @property
    def num_matvecs(self) -> int:
        """Products of ``H`` and ``H₀`` taken (a residual product counts one of each)."""
        parts = (self.hessian, self.gauss_newton, self.trace_hessian, self.trace_gauss_newton)
        single = sum(p.num_matvecs for p in parts)
        return single + 2 * (self.residual.num_matvecs + self.trace_residual.num_matvecs)


def spectrum_decomposition(
    hessian: CurvatureOperator,
    gauss_newton: CurvatureOperator,
    *,
    num_iters: int = 80,
    num_runs: int = 10,
    trace_matvecs: int = 60,
    num_points: int = 1024,
    generator: torch.Generator | int | None = None,
) -> SpectrumDecomposition:
    """Spectral densities and traces of ``H``, ``H₀`` and ``H₁ = H − H₀`` at one point.

    Parameters
    ----------
    hessian : CurvatureOperator
        ``H``, e.g. a :class:`~lightning_curvature.curvature.HessianOperator`.
    gauss_newton : CurvatureOperator
        ``H₀`` on the same parameters and data, e.g. a
        :class:`~lightning_curvature.curvature.GGNOperator`.
    num_iters, num_runs, num_points
        As :func:`~lightning_curvature.curvature.spectral_density` (for each of the three).
    trace_matvecs : int
        Products per Hutch++ trace (``>= 4``).
    generator : torch.Generator or int, optional
        One seed is drawn from it and reused for the three parts (common random numbers: the
        differences between the spectra are not probe noise).

    Returns
    -------
    SpectrumDecomposition
    """
    if hessian.dim != gauss_newton.dim:
        raise ValueError(
            f"`gauss_newton` must act on the same space as `hessian` (dim {hessian.dim}), "
            f"got dim {gauss_newton.dim}"
        )
    check_int("trace_matvecs", trace_matvecs, minimum=4)
    seed = int(torch.randint(0, 2**62, (1,), generator=as_generator(generator)))
    residual = hessian - gauss_newton
    densities = [
        spectral_density(
            op, num_iters=num_iters, num_runs=num_runs, num_points=num_points, generator=seed
        )
        for op in (hessian, gauss_newton, residual)
    ]
    traces = [
        hutchpp_trace(op, trace_matvecs, generator=seed + 1)
        for op in (hessian, gauss_newton, residual)
    ]
    return SpectrumDecomposition(*densities, *traces)
