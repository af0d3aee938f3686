"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit start vector ``q`` and ``A = U Λ Uᵀ``, ``qᵀ f(A) q = Σ_i (u_iᵀq)² f(λ_i)``: an integral
against a spectral measure whose expectation over random ``q`` (Rademacher, normalized) is the
eigenvalue density ``(1/d) Σ_i δ(t − λ_i)``. ``k`` Lanczos steps from ``q`` give the ``k``-point
Gauss quadrature of that measure: nodes are the Ritz values ``θ_j`` and weights the squared first
components ``τ_j²`` of the eigenvectors of ``T_k`` (Golub & Meurant 2010). Averaging over runs and
broadening each node by a Gaussian gives a smooth density (Lin, Saad & Yang, *Approximating
spectral densities of large matrices*, SIAM Review 2016; Ghorbani, Krishnan & Xiao, ICML 2019;
Yao et al., *PyHessian*, 2020).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .lanczos import lanczos
from .operators import check_operator, operator_device, operator_dtype
from .probes import as_generator, rademacher
from .results import SpectralDensity

__all__ = ["spectral_density"]


def spectral_density(
    op: Any,
    *,
    num_iters: int = 80,
    num_runs: int = 10,
    num_points: int = 1024,
    sigma: float | None = None,
    generator: torch.Generator | int | None = None,
    grid_margin: float = 6.0,
) -> SpectralDensity:
    """SLQ estimate of the eigenvalue density of a symmetric operator.

    Parameters
    ----------
    op : operator
        Any object with ``dim`` and ``matvec``.
    num_iters : int
        Lanczos steps per run (quadrature nodes; capped at ``dim``).
    num_runs : int
        Independent Rademacher start vectors (``>= 1``).
    num_points : int
        Grid points (``>= 2``).
    sigma : float, optional
        Gaussian broadening width; default ``0.01 · (θ_max − θ_min)`` over all nodes.
    generator : torch.Generator or int, optional
        Source of the start vectors.
    grid_margin : float
        The grid spans ``[θ_min − grid_margin·σ, θ_max + grid_margin·σ]`` so that the density
        integrates to one up to ``erfc(grid_margin/√2)``.

    Returns
    -------
    SpectralDensity
        ``density`` on ``grid``; ``nodes``/``weights`` per run (``(num_runs, k)``; runs that
        stopped early on an invariant subspace are padded with zero-weight nodes).
    """
    dim = check_operator(op)
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
    if not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"num_runs must be an int >= 1, got {num_runs!r}")
    if not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if grid_margin < 0:
        raise ValueError(f"grid_margin must be >= 0, got {grid_margin}")
    start = time.perf_counter()
    gen = as_generator(generator)
    k = min(num_iters, dim)
    nodes = torch.zeros(num_runs, k, dtype=torch.float64)
    weights = torch.zeros(num_runs, k, dtype=torch.float64)
    matvecs = 0
    for r in range(num_runs):
        probe = rademacher(dim, 1, gen, operator_dtype(op), operator_device(op))[:, 0]
        result = lanczos(op, k, v0=probe, generator=gen, keep_basis=False)
        theta, vectors = result.ritz()
        n = theta.numel()
        nodes[r, :n] = theta
        weights[r, :n] = vectors[0, :] ** 2
        if n < k:  # padding: place unused nodes on a real one, with zero weight
            nodes[r, n:] = theta[0]
        matvecs += result.num_matvecs
    used = weights > 0
    lo = float(nodes[used].min()) if used.any() else 0.0
    hi = float(nodes[used].max()) if used.any() else 0.0
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 1e-3
    grid = torch.linspace(lo - grid_margin * sigma, hi + grid_margin * sigma, num_points)
    grid = grid.to(torch.float64)
    density = torch.zeros(num_points, dtype=torch.float64)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi) * num_runs)
    for r in range(num_runs):
        z = (grid[:, None] - nodes[r][None, :]) / sigma
        density += norm * (torch.exp(-0.5 * z**2) * weights[r][None, :]).sum(dim=1)
    return SpectralDensity(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        num_matvecs=matvecs,
        seconds=time.perf_counter() - start,
        dim=dim,
    )
