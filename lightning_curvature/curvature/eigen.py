"""Extreme eigenpairs: both ends from one thick-restart Lanczos run, and the annihilation method.

:func:`extreme_eigenpairs` is a symmetric Krylov–Schur iteration (Stewart, *A Krylov–Schur
algorithm for large eigenproblems*, SIMAX 2001; equivalently thick-restart Lanczos, Wu & Simon,
SIMAX 2000). It keeps the relation ``A V_k = V_k S_k + v_{k+1} bᵀ`` with orthonormal ``V`` and
small symmetric ``S``. The basis grows by Lanczos steps with full reorthogonalization; the Ritz
pairs ``(θ_i, V y_i)`` of ``S`` have residual ``‖A V y_i − θ_i V y_i‖ = |bᵀ y_i|``. When the basis
is full it is compressed to the Ritz vectors at *both* ends of the spectrum (thick restart), so
the slowly converging small end keeps all the information gathered so far instead of starting
over as implicitly restarted ARPACK with a small basis does (SciPy's ``eigsh``). The iteration
stops when both extreme residuals are ``<= tol · ‖A‖`` with ``‖A‖ ≈ max(|θ_max|, |θ_min|)``;
the reported residuals are then recomputed with two explicit products.

:func:`opposite_sign_eigenpair` is the spectrum-shift ("annihilation") method used in the deep
learning literature (e.g. Ghorbani et al. 2019; Yao et al., *PyHessian*, 2020): power iteration
on ``A − λ₁I``, whose largest-magnitude eigenvalue is ``λ_opp − λ₁``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..checks import check_float, check_int
from .blocks import Block, resolve_blocks
from .lanczos import orthogonalize, start_vector
from .operators import CurvatureOperator, OperatorLike, as_operator
from .probes import as_generator, gaussian
from .results import ExtremeEigenpairs, LanczosResult, OppositeSignEigenpair

__all__ = [
    "block_extreme_eigenpairs",
    "extreme_eigenpairs",
    "extreme_ritz_pairs",
    "opposite_sign_eigenpair",
]


def _explicit_pairs(op: CurvatureOperator, vectors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh quotients and residual norms from explicit products (float64)."""
    vectors = vectors / vectors.to(torch.float64).norm(dim=0).to(vectors.dtype)
    images = op.matmat(vectors).to(torch.float64)
    v64 = vectors.to(torch.float64)
    rayleigh = (v64 * images).sum(dim=0)
    residuals = (images - v64 * rayleigh).norm(dim=0)
    return rayleigh.cpu(), residuals.cpu(), vectors


def extreme_eigenpairs(
    op: OperatorLike,
    *,
    max_iters: int = 500,
    tol: float = 1e-3,
    generator: torch.Generator | int | None = None,
    v0: Tensor | Sequence[Tensor] | None = None,
    max_basis: int = 80,
    warm_start_noise: float = 0.1,
) -> ExtremeEigenpairs:
    """Largest and smallest eigenpairs of a symmetric operator from one Lanczos run.

    Parameters
    ----------
    op : operator
        A :class:`~lightning_curvature.curvature.CurvatureOperator` or any object with ``dim``
        and ``matvec`` (``matmat`` used for the final check).
    max_iters : int
        Budget of Lanczos products (the two explicit residual products come on top).
    tol : float
        Stop when both Ritz residuals ``‖Av − θv‖ <= tol · max(|θ_max|, |θ_min|)``. The
        eigenvalue error is then about ``residual² / gap``, far below ``tol``.
    generator : torch.Generator or int, optional
        Source of the random start (and of restart vectors after a breakdown).
    v0 : Tensor or sequence of Tensors, optional
        Warm start, e.g. the previous epoch's ``(v_max, v_min)``: the normalized vectors are
        summed and mixed with ``warm_start_noise`` of a random direction.
    max_basis : int
        Basis size before a thick restart (memory: ``max_basis`` vectors of length ``dim``).
    warm_start_noise : float
        Relative norm of the random component added to a warm start (``>= 0``).

    Returns
    -------
    ExtremeEigenpairs
        Rayleigh quotients and residuals recomputed with explicit products; ``converged`` says
        whether those residuals meet ``tol``.
    """
    op = as_operator(op)
    dim = op.dim
    check_int("max_iters", max_iters, minimum=1)
    check_float("tol", tol, low=0.0, low_open=True)
    check_int("max_basis", max_basis, minimum=4)
    check_float("warm_start_noise", warm_start_noise, low=0.0)
    start = time.perf_counter()
    gen = as_generator(generator)
    q = start_vector(op, v0, gen, noise=warm_start_noise if v0 is not None else 0.0)
    dtype, device = q.dtype, q.device
    m = min(max_basis, dim)
    basis = torch.zeros(dim, m + 1, dtype=dtype, device=device)
    proj = torch.zeros(m, m, dtype=torch.float64)  # S
    basis[:, 0] = q
    k = 0  # columns of V with a filled row/column of S
    matvecs = 0
    restarts = 0
    beta = 0.0
    eps = torch.finfo(dtype).eps
    theta = torch.zeros(1, dtype=torch.float64)
    ritz = torch.ones(1, 1, dtype=torch.float64)
    converged = False
    while True:
        # -- expand the basis by Lanczos steps -------------------------------------------
        while k < m and matvecs < max_iters:
            w = op.matvec(basis[:, k])
            matvecs += 1
            diagonal = float(basis[:, k].to(torch.float64) @ w.to(torch.float64))
            w, coef = orthogonalize(w, basis[:, : k + 1])
            coef[k] = diagonal  # float64 from the product itself, not the projection pass
            proj[: k + 1, k] = coef
            proj[k, : k + 1] = coef
            beta = float(w.to(torch.float64).norm())
            k += 1
            theta, ritz = torch.linalg.eigh(proj[:k, :k])
            scale = max(abs(float(theta[0])), abs(float(theta[-1])), 1e-300)
            if beta <= 100 * eps * scale:
                # Invariant subspace: the Ritz pairs are exact. Continue in a random direction
                # orthogonal to the basis so that missed parts of the spectrum can still show up.
                beta = 0.0
                if k == dim:
                    break
                w = gaussian(dim, 1, gen, dtype, device)[:, 0]
                w, _ = orthogonalize(w, basis[:, :k])
                basis[:, k] = w / w.norm()
            else:
                basis[:, k] = w / beta
            residuals = beta * ritz[k - 1, :].abs()
            if k >= 2 and max(float(residuals[0]), float(residuals[-1])) <= tol * scale:
                converged = True
                break
        if converged or matvecs >= max_iters or k == dim:
            break
        # -- thick restart: keep Ritz vectors from both ends -----------------------------
        keep_each = max(1, m // 4)
        idx = torch.cat([torch.arange(keep_each), torch.arange(k - keep_each, k)])
        y = ritz[:, idx]
        kept = basis[:, :k] @ y.to(dtype=dtype, device=device)
        next_vector = basis[:, k].clone()
        p = idx.numel()
        basis.zero_()
        basis[:, :p] = kept
        basis[:, p] = next_vector
        proj.zero_()
        proj[:p, :p] = torch.diag(theta[idx])
        # proj[:p, p] = b = β y_last is recomputed explicitly by the next expansion step.
        k = p
        restarts += 1
    order = torch.argsort(theta)
    lo, hi = int(order[0]), int(order[-1])
    vectors = basis[:, :k] @ ritz[:, [hi, lo]].to(dtype=dtype, device=device)
    return _checked_pairs(
        op, vectors, tol, matvecs=matvecs, seconds_from=start, num_restarts=restarts
    )


def _checked_pairs(
    op: CurvatureOperator,
    vectors: Tensor,
    tol: float,
    *,
    matvecs: int,
    seconds_from: float,
    num_restarts: int = 0,
) -> ExtremeEigenpairs:
    """Two Ritz vectors ``[v_max, v_min]`` checked by one explicit product each."""
    rayleigh, residuals, vectors = _explicit_pairs(op, vectors)
    scale = max(abs(float(rayleigh[0])), abs(float(rayleigh[1])))
    ok = bool(residuals.max() <= tol * scale) if scale > 0 else bool(residuals.max() == 0)
    return ExtremeEigenpairs(
        lambda_max=float(rayleigh[0]),
        lambda_min=float(rayleigh[1]),
        v_max=vectors[:, 0].clone(),
        v_min=vectors[:, 1].clone(),
        residual_max=float(residuals[0]),
        residual_min=float(residuals[1]),
        converged=ok,
        num_matvecs=matvecs + 2,
        seconds=time.perf_counter() - seconds_from,
        num_restarts=num_restarts,
    )


def extreme_ritz_pairs(op: OperatorLike, run: LanczosResult, tol: float) -> ExtremeEigenpairs:
    """The extreme Ritz pairs of an existing Lanczos run, checked with two explicit products.

    ``θ, S = eig(T_k)``; ``v_max = Q_k s_max``, ``v_min = Q_k s_min``; the reported eigenvalues
    are the Rayleigh quotients ``vᵀAv`` and the residuals ``‖Av − (vᵀAv) v‖`` of one explicit
    product each (as :func:`extreme_eigenpairs` reports its own run). ``tol`` is relative to
    ``max(|λ_max|, |λ_min|)`` and only sets the ``converged`` flag.
    """
    if run.basis is None:
        raise ValueError("`run` must keep its Lanczos basis (run.basis is None)")
    tol = check_float("tol", tol, low=0.0, low_open=True)  # type: ignore[assignment]
    start = time.perf_counter() - run.seconds
    theta, ritz = run.ritz()
    cols = ritz[:, [theta.numel() - 1, 0]].to(dtype=run.basis.dtype, device=run.basis.device)
    return _checked_pairs(
        as_operator(op), run.basis @ cols, tol, matvecs=run.num_matvecs, seconds_from=start
    )


def opposite_sign_eigenpair(
    op: OperatorLike,
    eigenvalue: float,
    eigenvector: Tensor | None = None,
    *,
    max_iters: int = 1000,
    tol: float = 1e-3,
    generator: torch.Generator | int | None = None,
    v0: Tensor | None = None,
) -> OppositeSignEigenpair:
    """The eigenpair at the other end of the spectrum by the annihilation (shift) method.

    With ``λ₁`` an extreme eigenvalue (usually the largest), every eigenvalue of ``B = A − λ₁I``
    has the sign of ``λ_opp − λ₁``, and the largest in magnitude is ``λ_opp − λ₁``. Power
    iteration on ``B`` converges to it at the rate ``|λ_next − λ₁| / |λ_opp − λ₁|``; adding
    ``λ₁`` back gives ``λ_opp``. The eigenvector of ``λ₁`` is mapped to zero ("annihilated");
    when given, it is also projected out of the iterates.

    Parameters
    ----------
    op : operator
        A :class:`~lightning_curvature.curvature.CurvatureOperator` or any object with ``dim``
        and ``matvec``. The power iteration runs on the composed operator ``op.shift(λ₁)``.
    eigenvalue : float
        The known extreme eigenvalue ``λ₁``.
    eigenvector : Tensor, optional
        Its eigenvector (deflated from the iterates).
    max_iters : int
        Maximum power iterations (one product each; one more for the final residual).
    tol : float
        Stop when the shifted Rayleigh quotient changes by less than ``tol`` relative (the
        criterion of PyHessian's power iteration).
    generator : torch.Generator or int, optional
        Source of the random start vector.
    v0 : Tensor, optional
        Start vector.

    Returns
    -------
    OppositeSignEigenpair
    """
    op = as_operator(op)
    dim = op.dim
    check_int("max_iters", max_iters, minimum=1)
    check_float("tol", tol, low=0.0, low_open=True)
    check_float("eigenvalue", eigenvalue)
    start = time.perf_counter()
    gen = as_generator(generator)
    v = start_vector(op, v0, gen)
    known = None
    if eigenvector is not None:
        if eigenvector.numel() != dim:
            raise ValueError(f"eigenvector must have {dim} elements")
        known = eigenvector.detach().reshape(-1).to(v)
        known = (known / known.norm())[:, None]

    def deflate(x: Tensor) -> Tensor:
        return x if known is None else orthogonalize(x, known)[0]

    shifted = op.shift(eigenvalue)
    v = deflate(v)
    v = v / v.norm()
    mu = None
    converged = False
    iters = 0
    for _ in range(max_iters):
        w = deflate(shifted.matvec(v))
        iters += 1
        new_mu = float(v.to(torch.float64) @ w.to(torch.float64))
        norm = w.norm()
        if norm == 0:
            mu, converged = new_mu, True
            break
        v = w / norm
        if mu is not None and abs(new_mu - mu) <= tol * abs(new_mu):
            mu, converged = new_mu, True
            break
        mu = new_mu
    rayleigh, residuals, vectors = _explicit_pairs(op, v[:, None])
    return OppositeSignEigenpair(
        eigenvalue=float(rayleigh[0]),
        eigenvector=vectors[:, 0].clone(),
        residual=float(residuals[0]),
        converged=converged,
        num_matvecs=iters + 1,
        seconds=time.perf_counter() - start,
    )


def block_extreme_eigenpairs(
    op: OperatorLike,
    blocks: Sequence[Block] | None = None,
    **kwargs: Any,
) -> dict[str, ExtremeEigenpairs]:
    """Extreme eigenpairs of each diagonal block ``A_bb`` (e.g. one layer's weight).

    Runs :func:`extreme_eigenpairs` on the block-restricted operator ``op.restrict(start,
    stop)`` of every block; each of its products costs one full product of ``op``. For a
    Hessian, ``λ_max(H_bb)`` is the sharpest curvature when only that tensor moves (by Cauchy
    interlacing ``λ_min(H) <= λ(H_bb) <= λ_max(H)``).

    Parameters
    ----------
    op : operator
        A :class:`~lightning_curvature.curvature.CurvatureOperator` or any object with ``dim``
        and ``matvec``.
    blocks : sequence of (name, start, stop), optional
        Default one per parameter tensor of ``op.layout``.
    **kwargs
        Passed to :func:`extreme_eigenpairs` (``tol``, ``max_iters``, ``generator``, ...).

    Returns
    -------
    dict of str to ExtremeEigenpairs
        Keyed by block name; vectors live in the block's coordinates.
    """
    base = as_operator(op)
    parts = resolve_blocks(base, blocks)
    if not parts:
        raise ValueError("`blocks` must be given when the operator has no parameter layout")
    return {name: extreme_eigenpairs(base.restrict(a, b), **kwargs) for name, a, b in parts}
