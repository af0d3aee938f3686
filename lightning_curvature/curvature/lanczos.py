"""Lanczos tridiagonalization with full reorthogonalization.

``k`` steps build an orthonormal basis ``Q_k`` of the Krylov space ``span{q, Aq, …, A^{k−1}q}``
and the tridiagonal ``T_k = Q_kᵀ A Q_k`` (Lanczos 1950; Golub & Van Loan, *Matrix
Computations*, §10.1). In floating point the plain three-term recurrence loses orthogonality as
Ritz values converge and produces spurious copies of them ("ghosts"); every new vector is
therefore reorthogonalized against the whole basis. :func:`lanczos` takes the three-term
recurrence ``w = Aq_j − α_j q_j − β_{j−1} q_{j−1}`` first (it removes the large components, at
the cost of two vector updates) and then one classical Gram–Schmidt pass against every basis
vector, repeated when that pass removed more than ``1 − 1/√2`` of the norm (the criterion of
Daniel, Gragg, Kaufman & Stewart 1976: only then has cancellation left rounding errors of the
vector's own size; "twice is enough", Giraud et al. 2005). The basis is held as rows, so each
pass reads the ``j`` vectors built so far and nothing else. The entries of ``T`` are kept in
float64; the inner products and norms behind them run in the operator's dtype.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from .operators import OperatorLike, as_operator
from .probes import as_generator, gaussian
from .results import LanczosResult

__all__ = ["lanczos", "orthogonalize", "parallel_lanczos", "start_vector"]


def start_vector(
    op: OperatorLike,
    v0: Tensor | Sequence[Tensor] | None,
    generator: torch.Generator,
    *,
    noise: float = 0.0,
) -> Tensor:
    """Unit start vector: ``v0``, the sum of the normalized tensors in ``v0``, or Gaussian.

    ``noise`` mixes in a random direction of that relative norm (keeps a warm start from being
    an exact invariant subspace, which would end the iteration with only those eigenpairs).
    """
    base = as_operator(op)
    dim, dtype, device = base.dim, base.dtype, base.device
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


#: Repeat a Gram–Schmidt pass when it left less than this share of the norm (DGKS).
_DGKS_ETA = 2**-0.5


def _reorthogonalize(w: Tensor, rows: Tensor) -> tuple[Tensor, float]:
    """``w`` minus its components along the orthonormal ``rows`` (one pass, a second by DGKS).

    Works in place on ``w`` (the caller's own vector) and returns it with its final norm.
    """
    norm = float(w.norm())
    for _ in range(2):
        before = norm
        w.addmv_(rows.T, rows @ w, alpha=-1)
        norm = float(w.norm())
        if norm >= _DGKS_ETA * before:
            break
    return w, norm


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
    op: OperatorLike,
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
        A symmetric :class:`~lightning_curvature.curvature.CurvatureOperator` or any object
        with ``dim`` and ``matvec``.
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
    op = as_operator(op)
    dim = op.dim
    start = time.perf_counter()
    gen = as_generator(generator)
    k_max = min(num_iters, dim)
    q = start_vector(op, v0, gen)
    rows = torch.empty(k_max, dim, dtype=q.dtype, device=q.device)  # q_j = rows[j]
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    # Relative breakdown threshold: β below this times ‖A‖ means an invariant subspace.
    eps = torch.finfo(q.dtype).eps
    scale = 0.0
    for j in range(k_max):
        rows[j] = q
        w = op.matvec(q)
        # α = qᵀAq straight from the product. Inner products and norms run in the operator's
        # dtype: its products carry that rounding already, and a float64 copy of every vector
        # cost a tenth of a step on a 2x256 MLP.
        alpha = float(torch.dot(q, w))
        w = torch.add(w, q, alpha=-alpha)  # a new vector: the updates below work in place
        if j > 0:
            w.add_(rows[j - 1], alpha=-beta)
        w, beta = _reorthogonalize(w, rows[: j + 1])
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
        basis=rows[: len(alphas)].T if keep_basis else None,
        residual_norm=beta,
        num_matvecs=len(alphas),
        seconds=time.perf_counter() - start,
    )


def parallel_lanczos(
    op: OperatorLike,
    num_iters: int,
    starts: Tensor,
) -> list[LanczosResult]:
    """Independent Lanczos runs from the columns of ``starts``, advanced together.

    Every step takes one ``matmat`` over the runs still going, so an operator with a real block
    product (:class:`~lightning_curvature.curvature.HessianOperator`) serves ``R`` runs for
    the price of its block route. Each run is exactly :func:`lanczos` from its own start vector
    (the same recurrence and reorthogonalization against its own basis, except that a second
    Gram–Schmidt pass is taken for the whole block when any run needs one; the same breakdown
    rule); a run that reaches an invariant subspace leaves the block.

    Parameters
    ----------
    op : operator
        A symmetric :class:`~lightning_curvature.curvature.CurvatureOperator` or any object
        with ``dim`` and ``matvec``.
    num_iters : int
        Steps per run (capped at ``dim``).
    starts : Tensor
        ``(dim, R)`` start vectors (normalized here).

    Returns
    -------
    list of LanczosResult
        One per run, without bases (``basis=None``); ``seconds`` is the wall time of the
        whole block.
    """
    op = as_operator(op)
    if not isinstance(num_iters, int) or isinstance(num_iters, bool) or num_iters < 1:
        raise ValueError(f"`num_iters` must be an integer >= 1, got {num_iters!r}")
    if starts.dim() != 2 or starts.shape[0] != op.dim or starts.shape[1] < 1:
        raise ValueError(f"`starts` must have shape ({op.dim}, R), got {tuple(starts.shape)}")
    start = time.perf_counter()
    dim, runs = op.dim, int(starts.shape[1])
    k_max = min(num_iters, dim)
    q = starts.to(device=op.device, dtype=torch.float64)
    q = (q / q.norm(dim=0, keepdim=True)).to(op.dtype).T.contiguous()  # (R, dim)
    basis = torch.empty(runs, k_max, dim, dtype=op.dtype, device=op.device)
    alphas: list[list[float]] = [[] for _ in range(runs)]
    betas: list[list[float]] = [[] for _ in range(runs)]
    last_beta = [0.0] * runs
    scale = [0.0] * runs
    eps = torch.finfo(op.dtype).eps
    active = list(range(runs))
    for j in range(k_max):
        if len(active) == runs:  # a view while every run goes on (no copy of the bases)
            basis[:, j] = q
            local = basis[:, : j + 1]
        else:
            idx = torch.tensor(active, device=op.device)
            basis[idx, j] = q
            local = basis[idx, : j + 1]  # (a, j+1, dim)
        w = op.matmat(q.T.contiguous()).T  # (len(active), dim)
        alpha_t = torch.bmm(q[:, None, :], w[:, :, None])[:, 0, 0]  # per-run qᵀAq
        alpha = alpha_t.to(torch.float64).cpu()
        # As in :func:`lanczos`: the three-term recurrence, then Gram–Schmidt passes per run
        # against its own basis until one removes less than 1 − 1/√2 of the norm (at most two).
        w = w - alpha_t[:, None] * q  # a new tensor: the updates below work in place
        if j > 0:
            prev_beta = torch.tensor([betas[r][-1] for r in active], dtype=w.dtype)
            w.sub_(prev_beta.to(w.device)[:, None] * local[:, j - 1])
        norm = w.norm(dim=1)
        for _ in range(2):
            before = norm
            h = torch.bmm(local, w[:, :, None])  # (a, j+1, 1)
            w.sub_(torch.bmm(local.transpose(1, 2), h)[:, :, 0])
            norm = w.norm(dim=1)
            if bool((norm >= _DGKS_ETA * before).all()):
                break
        beta = norm.to(torch.float64).cpu()
        still, nxt = [], []
        for pos, r in enumerate(active):
            a, b = float(alpha[pos]), float(beta[pos])
            alphas[r].append(a)
            scale[r] = max(scale[r], abs(a), b)
            last_beta[r] = b
            if j == k_max - 1:
                continue
            if b <= 10 * eps * max(scale[r], 1e-300) * dim**0.5:
                last_beta[r] = 0.0
                continue
            betas[r].append(b)
            still.append(r)
            nxt.append(w[pos] / b)
        if not still:
            break
        active, q = still, torch.stack(nxt)
    seconds = time.perf_counter() - start
    return [
        LanczosResult(
            alphas=torch.tensor(alphas[r], dtype=torch.float64),
            betas=torch.tensor(betas[r], dtype=torch.float64),
            basis=None,
            residual_norm=last_beta[r],
            num_matvecs=len(alphas[r]),
            seconds=seconds,
        )
        for r in range(runs)
    ]
