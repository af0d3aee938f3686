"""Lanczos tridiagonalization with full reorthogonalization.

``k`` steps build an orthonormal basis ``Q_k`` of the Krylov space ``span{q, Aq, …, A^{k−1}q}``
and the tridiagonal ``T_k = Q_kᵀ A Q_k`` (Lanczos 1950; Golub & Van Loan, *Matrix
Computations*, §10.1). In floating point the plain three-term recurrence loses orthogonality as
Ritz values converge and produces spurious copies of them ("ghosts"); every new vector is
therefore Gram–Schmidt orthogonalized twice against the whole basis ("twice is enough",
Giraud et al. 2005). Inner products and the entries of ``T`` are accumulated in float64.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .operators import check_operator, operator_device, operator_dtype
from .probes import as_generator, gaussian
from .results import LanczosResult

__all__ = ["lanczos", "orthogonalize", "start_vector"]


def start_vector(
    op: Any,
    v0: Tensor | Sequence[Tensor] | None,
    generator: torch.Generator,
    *,
    noise: float = 0.0,
) -> Tensor:
    """Unit start vector: ``v0``, the sum of the normalized tensors in ``v0``, or Gaussian.

    ``noise`` mixes in a random direction of that relative norm (keeps a warm start from being
    an exact invariant subspace, which would end the iteration with only those eigenpairs).
    """
    dim = check_operator(op)
    dtype, device = operator_dtype(op), operator_device(op)
    rand = gaussian(dim, 1, generator, torch.float64, device)[:, 0]
    rand = rand / rand.norm()
    if v0 is None:
        return rand.to(dtype)
    vectors = [v0] if isinstance(v0, Tensor) else list(v0)
    if not vectors:
        raise ValueError("v0 must be a tensor or a non-empty sequence of tensors")
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    for k, v in enumerate(vectors):
        if not isinstance(v, Tensor) or v.numel() != dim:
            raise ValueError(f"v0[{k}] must be a tensor with {dim} elements")
        v = v.detach().reshape(-1).to(device=device, dtype=torch.float64)
        norm = v.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError(f"v0[{k}] must be finite and nonzero")
        total += v / norm
    if total.norm() == 0:  # e.g. (v, -v)
        total = rand.clone()
    total = total / total.norm() + noise * rand
    return (total / total.norm()).to(dtype)


def orthogonalize(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Remove the span of ``basis`` (orthonormal columns) from ``w`` by two Gram–Schmidt passes.

    Returns the projected vector and the float64 coefficients ``basisᵀ w`` (summed over passes).
    """
    coef = torch.zeros(basis.shape[1], dtype=torch.float64)
    for _ in range(2):
        h = basis.T @ w
        w = w - basis @ h
        coef += h.to(torch.float64).cpu()
    return w, coef


def lanczos(
    op: Any,
    num_iters: int,
    *,
    v0: Tensor | Sequence[Tensor] | None = None,
    generator: torch.Generator | int | None = None,
    keep_basis: bool = True,
) -> LanczosResult:
    """Run ``num_iters`` Lanczos steps with full reorthogonalization.

    Parameters
    ----------
    op : operator
        Any object with ``dim`` and ``matvec`` (a symmetric operator).
    num_iters : int
        Steps ``k >= 1`` (capped at ``dim``). Stops early on an invariant subspace (``β = 0``).
    v0 : Tensor or sequence of Tensors, optional
        Start vector (a sequence is summed after normalizing each); default Gaussian.
    generator : torch.Generator or int, optional
        Source of the random start vector.
    keep_basis : bool
        Return ``Q_k`` (the basis is held during the run either way).

    Returns
    -------
    LanczosResult
        ``alphas``, ``betas`` (float64) of ``T_k``, the basis, ``β_k`` and the cost.
    """
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
    dim = check_operator(op)
    start = time.perf_counter()
    gen = as_generator(generator)
    k_max = min(num_iters, dim)
    q = start_vector(op, v0, gen)
    basis = torch.zeros(dim, k_max, dtype=q.dtype, device=q.device)
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    # Relative breakdown threshold: β below this times ‖A‖ means an invariant subspace.
    eps = torch.finfo(q.dtype).eps
    scale = 0.0
    for j in range(k_max):
        basis[:, j] = q
        w = op.matvec(q)
        # α = qᵀAq straight from the product, in float64 (the projection pass below runs in the
        # operator's dtype).
        alpha = float(q.to(torch.float64) @ w.to(torch.float64))
        w, _ = orthogonalize(w, basis[:, : j + 1])
        beta = float(w.to(torch.float64).norm())
        alphas.append(alpha)
        scale = max(scale, abs(alpha), beta)
        if j == k_max - 1:
            break
        if beta <= 10 * eps * max(scale, 1e-300) * dim**0.5:
            beta = 0.0
            break
        betas.append(beta)
        q = w / beta
    return LanczosResult(
        alphas=torch.tensor(alphas, dtype=torch.float64),
        betas=torch.tensor(betas, dtype=torch.float64),
        basis=basis[:, : len(alphas)] if keep_basis else None,
        residual_norm=beta,
        num_matvecs=len(alphas),
        seconds=time.perf_counter() - start,
    )
