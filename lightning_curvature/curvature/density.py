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

import torch
from torch import Tensor

from ..checks import check_float, check_int
from .lanczos import parallel_lanczos
from .operators import OperatorLike, as_operator
from .probes import as_generator, gaussian, rademacher
from .results import SpectralDensity

__all__ = ["spectral_density"]


#: Bytes of Lanczos bases a parallel block of SLQ runs may hold (``R x k x dim`` entries).
PARALLEL_BASIS_BYTES = 256 * 1024**2


def spectral_density(
    op: OperatorLike,
    *,
    num_iters: int = 80,
    num_runs: int = 10,
    num_points: int = 1024,
    sigma: float | None = None,
    generator: torch.Generator | int | None = None,
    grid_margin: float = 6.0,
    runs_per_block: int | None = None,
) -> SpectralDensity:
    """SLQ estimate of the eigenvalue density of a symmetric operator.

    Parameters
    ----------
    op : operator
        A :class:`~lightning_curvature.curvature.CurvatureOperator` or any object with ``dim``
        and ``matvec``.
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
    runs_per_block : int, optional
        Runs advanced together, one block product per Lanczos step
        (:func:`~lightning_curvature.curvature.lanczos.parallel_lanczos`); default as many as
        keep their bases under ``PARALLEL_BASIS_BYTES``. The numbers do not depend on it (up to
        rounding): the probes are drawn in the same order either way.

    Returns
    -------
    SpectralDensity
        ``density`` on ``grid``; ``nodes``/``weights`` per run (``(num_runs, k)``; runs that
        stopped early on an invariant subspace are padded with zero-weight nodes);
        ``residuals`` the Ritz residual bound of each node; ``tau`` the resolution of
        :meth:`SpectralDensity.index`: the largest residual ``r_j`` of a node with
        ``|θ_j| <= r_j`` (its sign undecided by the run), at least ``√ε · max|θ|`` with ``ε``
        the machine epsilon of the operator's dtype.
    """
    op = as_operator(op)
    dim = op.dim
    check_int("num_iters", num_iters, minimum=1)
    check_int("num_runs", num_runs, minimum=1)
    check_int("num_points", num_points, minimum=2)
    check_float("sigma", sigma, low=0.0, low_open=True, allow_none=True)
    check_float("grid_margin", grid_margin, low=0.0)
    check_int("runs_per_block", runs_per_block, minimum=1, allow_none=True)
    start = time.perf_counter()
    gen = as_generator(generator)
    k = min(num_iters, dim)
    if runs_per_block is None:
        per_run = k * dim * torch.finfo(op.dtype).bits // 8
        runs_per_block = max(1, min(num_runs, PARALLEL_BASIS_BYTES // max(per_run, 1)))
    nodes = torch.zeros(num_runs, k, dtype=torch.float64)
    weights = torch.zeros(num_runs, k, dtype=torch.float64)
    residuals = torch.zeros(num_runs, k, dtype=torch.float64)
    matvecs = 0
    for first in range(0, num_runs, runs_per_block):
        count = min(runs_per_block, num_runs - first)
        probes = []
        for _ in range(count):
            probes.append(rademacher(dim, 1, gen, op.dtype, op.device)[:, 0])
            # one Gaussian draw per run, as lanczos() takes for its random start, so that the
            # stream (and the numbers) do not depend on runs_per_block
            gaussian(dim, 1, gen, torch.float64, op.device)
        results = parallel_lanczos(op, k, torch.stack(probes, dim=1))
        for r, result in enumerate(results, start=first):
            theta, vectors = result.ritz()
            n = theta.numel()
            nodes[r, :n] = theta
            weights[r, :n] = vectors[0, :] ** 2
            # ‖A y − θ y‖ = β_k |s_kj| for the Ritz pair (θ_j, Q s_j): a true eigenvalue lies
            # within it of θ_j
            residuals[r, :n] = result.residual_norm * vectors[-1, :].abs()
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
    tau = _index_resolution(nodes, residuals, used, math.sqrt(torch.finfo(op.dtype).eps))
    return SpectralDensity(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        num_matvecs=matvecs,
        seconds=time.perf_counter() - start,
        dim=dim,
        tau=tau,
        residuals=residuals,
    )


def _index_resolution(nodes: Tensor, residuals: Tensor, used: Tensor, rel_floor: float) -> float:
    """τ: the largest Ritz residual of a node whose sign it leaves open, floored at rounding.

    A node ``θ_j`` with ``|θ_j| <= r_j`` (its residual bound) may stand for eigenvalues on
    either side of zero, typically the null-space atom of an over-parameterized network's
    Hessian, which Lanczos resolves slowly because the spectrum has no gap around it. Counting
    only nodes below ``−τ`` keeps such a node out of the index. The floor ``√ε · max|θ|``
    covers the rounding of the products.
    """
    floor = rel_floor * float(nodes[used].abs().max()) if used.any() else 0.0
    unresolved = used & (nodes.abs() <= residuals)
    open_sign = float(residuals[unresolved].max()) if unresolved.any() else 0.0
    return max(floor, open_sign)
