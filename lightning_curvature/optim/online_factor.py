r"""One online Fisher factor of Kaldi's natural-gradient SGD (Povey, Zhang & Khudanpur 2015).

A factor approximates the D×D (uncentered) covariance of the rows of a stream of matrices
``X_t`` (N_t × D) by a low-rank-plus-identity matrix

    F_t = R_tᵀ D_t R_t + ρ_t I,      R_t (R×D) with orthonormal rows, D_t = diag(d_t) > 0,

kept through the scaled factor ``W_t = E_t^{1/2} R_t`` with

    β_t = ρ_t (1 + α) + α·tr(D_t)/D,      e_ti = 1 / (β_t/d_ti + 1),      E_t = diag(e_t).

*Preconditioning.* ``X̂_t = X_t − X_t W_tᵀ W_t`` equals ``β_t X_t (F_t + α·tr(F_t)/D·I)⁻¹``
(Woodbury: ``R_tᵀ E_t R_t`` is the low-rank part of ``I − β_t(F_t + κ_t I)⁻¹`` with
``κ_t = α·tr(F_t)/D = α(ρ_t + tr(D_t)/D)``, so ``β_t = ρ_t + κ_t``); the caller rescales
``X̂_t`` to the Frobenius norm of ``X_t``, which removes the arbitrary factor β_t.

*Online update* (paper, appendix C; Kaldi ``natural-gradient-online.h``). With forgetting η the
target is ``T_t = (η/N) X_tᵀ X_t + (1 − η) F_t`` and one step of subspace iteration
``Y_t = R_t T_t``:

    Y_t Y_tᵀ = U_t C_t U_tᵀ  (eigenvalues c descending, floored at (ρ_t(1−η))²),
    ρ_{t+1}  = (tr T_t − tr C_t^{1/2}) / (D − R),
    d_{t+1}  = max(C_t^{1/2} − ρ_{t+1}, f),   ρ_{t+1} ← max(ρ_{t+1}, f),
               f = max(ε, δ·max C_t^{1/2}),   δ = 5·10⁻⁴,
    R_{t+1}  = C_t^{-1/2} U_tᵀ Y_t,           W_{t+1} = E_{t+1}^{1/2} R_{t+1}.

The trace-preserving ρ keeps ``tr F_{t+1} = tr T_t`` (before the floors). Nothing D×D is ever
formed: with ``H = X Wᵀ``, ``J = Hᵀ X = W XᵀX``, ``K = J Jᵀ`` and ``L = W XᵀX Wᵀ`` (= ``J Wᵀ``
or ``HᵀH``), ``Y_t = (η/N) E_t^{-1/2} B_t`` where ``B_t = J_t + ((1−η)N/η)(D_t + ρ_t I) W_t``, and

    Y_t Y_tᵀ = (η/N)² E^{-½} K E^{-½} + (η/N)(1−η)[E^{-½} L E^{-½}(D+ρI) + (D+ρI) E^{-½} L E^{-½}]
               + (1−η)² (D + ρI)²,

a R×R matrix (divided by ``max(1, tr K)`` before its eigendecomposition to keep the fourth
powers of the gradient in range), and ``W_{t+1} = (η/N) E_{t+1}^{½} C_t^{-½} U_tᵀ E_t^{-½} B_t``.

*Initialization* (as Kaldi and its PyTorch port): ``ρ_0 = ε``, ``d_0 = ε·1``,
``R_0 = `` the rows of ``[1.1·I_R, I_R, I_R, …]`` (truncated to D columns) normalized (disjoint
supports, hence orthonormal; every column nonzero), then three updates on the first matrix
before it is preconditioned.

*Schedule.* The factor is updated on the calls numbered 0…9 and on every ``update_period``-th
call afterwards (counting from 0); on the others it is only applied.

References
----------
Povey, Zhang & Khudanpur (2015), "Parallel training of DNNs with natural gradient and parameter
averaging", ICLR workshop, arXiv:1410.7455, section 3 and appendix C.
Kaldi, ``src/nnet3/natural-gradient-online.h`` (the recursion as implemented).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DELTA",
    "INITIAL_UPDATES",
    "NUM_INITIAL_ITERS",
    "FactorSettings",
    "default_rank",
    "init_factor",
    "orthonormal_start",
    "precondition_rows",
    "smoothing",
]

#: Relative floor δ of the factor's eigenvalues (Kaldi's constant).
DELTA = 5e-4
#: The factor is updated on every call while fewer than this many calls were made.
NUM_INITIAL_ITERS = 10
#: Updates on the first matrix before it is preconditioned (a cheap power-method start).
INITIAL_UPDATES = 3
#: Added to ‖X̂‖² in the norm-restoring rescale (a zero gradient stays zero).
_TINY = 1e-30
#: Symmetry-breaking diagonal of the orthonormal start.
_FIRST_ELEM = 1.1


@dataclass(frozen=True)
class FactorSettings:
    """Hyperparameters of one factor (see the module docstring for the symbols)."""

    alpha: float
    eps: float
    eta: float
    update_period: int
    delta: float = DELTA


def default_rank(dim: int, max_rank: int = 80) -> int:
    """Rank of the low-rank part of an axis of size ``dim`` > 1: ``min((dim + 1)//2, max_rank)``."""
    return max(1, min((dim + 1) // 2, max_rank))


def orthonormal_start(rank: int, dim: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The fixed R×D start ``[1.1·I_R, I_R, I_R, …][:, :D]`` with rows scaled to unit norm."""
    cols = torch.arange(dim, device=device)
    rows = torch.arange(rank, device=device)
    start = (cols[None, :] % rank == rows[:, None]).to(dtype)
    start[rows, rows] = _FIRST_ELEM
    return start / start.norm(dim=1, keepdim=True)


def init_factor(dim: int, rank: int, settings: FactorSettings, like: Tensor) -> dict:
    """State before the first matrix: ``t = 0``, ``ρ = ε``, ``d = ε·1``, ``W = √e₀·R₀``.

    ``e₀ = 1/(2 + α(D + R)/D)`` is ``e`` at ``d = ε·1``, ``ρ = ε`` (it does not depend on ε).
    """
    if not 1 <= rank < dim:
        raise ValueError(f"a factor needs 1 <= rank < dim, got rank={rank}, dim={dim}")
    e0 = 1.0 / (2.0 + (dim + rank) * settings.alpha / dim)
    w = math.sqrt(e0) * orthonormal_start(rank, dim, dtype=like.dtype, device=like.device)
    d = torch.full((rank,), settings.eps, dtype=like.dtype, device=like.device)
    return {"t": 0, "W": w, "d": d, "rho": float(settings.eps)}


def smoothing(state: dict, alpha: float) -> tuple[float, float]:
    """``(κ_t, tr F_t)`` of the factor: ``tr F = tr D + Dρ``, ``κ = α·tr F/D``."""
    dim = state["W"].shape[1]
    trace = float(state["d"].sum()) + dim * state["rho"]
    return alpha * trace / dim, trace


def _updates_now(t: int, update_period: int) -> bool:
    return t < NUM_INITIAL_ITERS or t % update_period == 0


def precondition_rows(state: dict, x: Tensor, settings: FactorSettings) -> Tensor:
    """Precondition the rows of ``x`` (N×D) by the factor and rescale to ``‖x‖_F``; update it.

    ``state`` (from :func:`init_factor`) is updated in place: the first call runs the
    initialization updates on ``x``; every call advances ``t`` and, on the schedule, updates the
    factor with ``x``. Returns ``X̂·‖x‖_F/‖X̂‖_F`` (``X̂ = x − x WᵀW`` with the factor *before*
    this call's update). If the result is not finite, ``x`` is returned unchanged, the factor
    is reset to its initialization (re-run on the next call) and ``state["restarts"]`` counts it.
    """
    sq_norm = float(torch.linalg.vector_norm(x)) ** 2
    if state["t"] == 0:
        for _ in range(INITIAL_UPDATES):
            _apply(state, x, sq_norm, settings, update=True)
    update = _updates_now(state["t"], settings.update_period)
    out = _apply(state, x, sq_norm, settings, update=update)
    state["t"] += 1
    out_sq = float(torch.linalg.vector_norm(out)) ** 2
    if not math.isfinite(out_sq):
        rank, dim = state["W"].shape
        state.update(init_factor(dim, rank, settings, x))
        state["restarts"] = state.get("restarts", 0) + 1
        return x
    return out.mul_(math.sqrt(sq_norm / (out_sq + _TINY)))


def _apply(
    state: dict, x: Tensor, tr_x: float, settings: FactorSettings, *, update: bool
) -> Tensor:
    """``X̂ = x − (x Wᵀ) W``; with ``update``, also replace (W, d, ρ) by the next factor."""
    w = state["W"]
    if not x.is_contiguous() and x.T.is_contiguous():
        # x is the transpose of a contiguous D×N matrix y (axis 0 of a weight): work on y's
        # columns so that no transposed copy is made; X̂ᵀ = y − Wᵀ(W y), H = (W y)ᵀ.
        y = x.T
        g = w @ y
        h = g.T
        x_hat = torch.addmm(y, w.T, g, alpha=-1.0).T
    else:
        h = x @ w.T
        x_hat = torch.addmm(x, h, w, alpha=-1.0)
    if update:
        _update(state, x, h, tr_x, settings)
    return x_hat


def _update(state: dict, x: Tensor, h: Tensor, tr_x: float, settings: FactorSettings) -> None:
    w, d, rho = state["W"], state["d"], state["rho"]
    alpha, eta, eps = settings.alpha, settings.eta, settings.eps
    rank, dim = w.shape
    n = x.shape[0]
    j = h.T @ x  # W XᵀX, R×D
    # L = W XᵀX Wᵀ by the cheaper of the two products.
    ell = j @ w.T if n > dim else h.T @ h
    k = j @ j.T
    # The R×R algebra runs on the CPU (small sequential work; eigh is slow on GPUs).
    k_c, ell_c, d_c = k.cpu(), ell.cpu(), d.cpu()
    d_sum = float(d_c.sum())
    beta = rho * (1.0 + alpha) + alpha * d_sum / dim
    e = 1.0 / (beta / d_c + 1.0)
    inv_sqrt_e = 1.0 / torch.sqrt(e)
    scale = max(1.0, float(torch.trace(k_c)))  # any value works; keeps Z in range
    d_rho = d_c + rho
    a = eta / n
    outer_k = (a * a / scale) * torch.outer(inv_sqrt_e, inv_sqrt_e)
    cross = (a * (1.0 - eta) / scale) * torch.outer(inv_sqrt_e, inv_sqrt_e * d_rho)
    diag = torch.diag(((1.0 - eta) ** 2 / scale) * d_rho**2)
    z = k_c * outer_k + ell_c * (cross + cross.T) + diag
    c, u = torch.linalg.eigh(z)
    c, u = c.flip(0), u.flip(1)  # descending
    c = torch.clamp(c, min=(rho * (1.0 - eta)) ** 2 / scale)
    sqrt_c = torch.sqrt(c) * math.sqrt(scale)
    rho_next = (a * tr_x + (1.0 - eta) * (dim * rho + d_sum) - float(sqrt_c.sum())) * (
        1.0 / (dim - rank)
    )
    floor = max(eps, settings.delta * float(sqrt_c.max()))
    d_next = torch.clamp(sqrt_c - rho_next, min=floor)
    rho_next = max(rho_next, floor)
    beta_next = rho_next * (1.0 + alpha) + alpha * float(d_next.sum()) / dim
    e_next = 1.0 / (beta_next / d_next + 1.0)
    dev = w.device
    b = torch.addcmul(j, (((1.0 - eta) / a) * d_rho).to(dev)[:, None], w)
    left = (a * torch.sqrt(e_next) * (1.0 / sqrt_c)).to(dev)
    a_mat = u.T.to(dev) * torch.outer(left, inv_sqrt_e.to(dev))
    state["W"] = a_mat @ b
    state["d"] = d_next.to(dev)
    state["rho"] = float(rho_next)
