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

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import check_int
from .density import spectral_density
from .operators import CurvatureOperator
from .probes import as_generator, rademacher
from .results import SpectralDensity, SpectralIndex, TraceEstimate

__all__ = ["SpectrumDecomposition", "decomposition_traces", "spectrum_decomposition"]


@dataclass(frozen=True)
class SpectrumDecomposition:
    """Spectra and traces of ``H``, its Gauss–Newton part ``H₀`` and the residual ``H₁ = H − H₀``.

    Attributes
    ----------
    hessian, gauss_newton, residual : SpectralDensity
        SLQ densities of ``H``, ``H₀``, ``H₁`` (same start vectors for the three).
    trace_hessian, trace_gauss_newton, trace_residual : TraceEstimate
        Hutch++ traces on one sketch and one set of probes (:func:`decomposition_traces`):
        ``trace_hessian.value = trace_gauss_newton.value + trace_residual.value`` to rounding.
        The residual's is the difference of the other two's products (its ``num_matvecs`` is
        what it amounts to in ``H₁`` products, none of them taken separately).
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
        """Products of ``H`` and ``H₀`` taken (an SLQ product of ``H₁`` counts one of each; the
        residual trace takes none of its own)."""
        parts = (self.hessian, self.gauss_newton, self.trace_hessian, self.trace_gauss_newton)
        return sum(p.num_matvecs for p in parts) + 2 * self.residual.num_matvecs


def _trace_parts(low_rank: float, terms: Tensor, matvecs: int, seconds: float) -> TraceEstimate:
    n = terms.numel()
    stderr = float(terms.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    return TraceEstimate(low_rank + float(terms.mean()), stderr, matvecs, seconds, n)


def decomposition_traces(
    hessian: CurvatureOperator,
    gauss_newton: CurvatureOperator,
    num_matvecs: int = 60,
    *,
    generator: torch.Generator | int | None = None,
) -> tuple[TraceEstimate, TraceEstimate, TraceEstimate]:
    """Hutch++ traces of ``H``, ``H₀`` and ``H₁ = H − H₀`` on one sketch: they add up exactly.

    Hutch++ (Meyer, Musco, Musco & Woodruff 2021) is linear in the matrix for a fixed
    orthonormal ``Q`` and fixed probes ``z``: ``t(A) = tr(QᵀAQ) + (1/g) Σ zᵢᵀPAPzᵢ`` with
    ``P = I − QQᵀ``. With ``Q = orth(H S)`` (the sketch of ``H``, whose outliers are
    ``H₀``'s) and the same ``z`` for the three parts, ``t(H₁) = t(H) − t(H₀)`` term by term, so
    the residual costs no products of its own, and each part is unbiased (``Q`` is drawn
    independently of ``z``).

    Parameters
    ----------
    hessian, gauss_newton : CurvatureOperator
        ``H`` and ``H₀`` on the same space.
    num_matvecs : int
        Products of ``H`` (``>= 4``): ``s = m // 3`` sketch columns, ``s`` for ``HQ``,
        ``g = m − 2s`` probes (``s`` capped at ``dim``); ``H₀`` takes ``s + g``.
    generator : torch.Generator or int, optional
        Sketch and probe randomness.

    Returns
    -------
    (TraceEstimate, TraceEstimate, TraceEstimate)
        ``H``, ``H₀``, ``H₁``; each ``stderr`` is that of its own Hutchinson terms.
    """
    check_int("num_matvecs", num_matvecs, minimum=4)
    _same_dim(hessian, gauss_newton)
    start = time.perf_counter()
    gen = as_generator(generator)
    dim, device = hessian.dim, hessian.device
    sketch_size = min(num_matvecs // 3, dim)
    num_probes = num_matvecs - 2 * sketch_size
    sketch = rademacher(dim, sketch_size, gen, hessian.dtype, device)
    q, _ = torch.linalg.qr(hessian.matmat(sketch).to(torch.float64))
    probes = rademacher(dim, num_probes, gen, torch.float64, device)
    deflated = probes - q @ (q.T @ probes)
    columns = torch.cat([q, deflated], dim=1)
    images = [
        op.matmat(columns.to(op.dtype)).to(device=device, dtype=torch.float64)
        for op in (hessian, gauss_newton)
    ]
    images.append(images[0] - images[1])
    seconds = time.perf_counter() - start
    out = []
    for k, image in enumerate(images):
        aq, a_deflated = image.split([q.shape[1], num_probes], dim=1)
        terms = (deflated * a_deflated).sum(dim=0).cpu()
        matvecs = num_matvecs if k == 0 else sketch_size + num_probes
        out.append(_trace_parts(float((q * aq).sum()), terms, matvecs, seconds))
    return out[0], out[1], out[2]


def _same_dim(hessian: CurvatureOperator, gauss_newton: CurvatureOperator) -> None:
    if hessian.dim != gauss_newton.dim:
        raise ValueError(
            f"`gauss_newton` must act on the same space as `hessian` (dim {hessian.dim}), "
            f"got dim {gauss_newton.dim}"
        )


def spectrum_decomposition(
    hessian: CurvatureOperator,
    gauss_newton: CurvatureOperator,
    *,
    num_iters: int = 80,
    num_runs: int = 10,
    trace_matvecs: int = 60,
    num_points: int = 1024,
    sigma: float | None = None,
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
    num_iters, num_runs, num_points, sigma
        As :func:`~lightning_curvature.curvature.spectral_density` (for each of the three).
    trace_matvecs : int
        Products of ``H`` for the traces (``>= 4``; :func:`decomposition_traces`).
    generator : torch.Generator or int, optional
        One seed is drawn from it and reused for the three parts (common random numbers: the
        differences between the spectra are not probe noise).

    Returns
    -------
    SpectrumDecomposition
    """
    _same_dim(hessian, gauss_newton)
    check_int("trace_matvecs", trace_matvecs, minimum=4)
    gen = as_generator(generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    residual = hessian - gauss_newton
    densities = [
        spectral_density(
            op,
            num_iters=num_iters,
            num_runs=num_runs,
            num_points=num_points,
            sigma=sigma,
            generator=seed,
        )
        for op in (hessian, gauss_newton, residual)
    ]
    traces = decomposition_traces(hessian, gauss_newton, trace_matvecs, generator=seed + 1)
    return SpectrumDecomposition(*densities, *traces)
