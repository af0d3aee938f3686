"""The sample-space solve of one NGD step: span coefficients, κ, SPD solve, Woodbury remainder.

With ``F = GᵀG/B`` (``G`` the N×d pseudo-sample gradient matrix of :mod:`.sample_space`) and
``K = G Gᵀ``, the push-through identity ``(GᵀG/B + κI)⁻¹ Gᵀ = Gᵀ(K/B + κI)⁻¹`` gives, for a
gradient ``g = Gᵀv`` in the row span of ``G``::

    Δ = (F + κI)⁻¹ g = B · Gᵀ (K + BκI)⁻¹ v,

and for a remainder ``r = g − Gᵀv`` the Woodbury identity::

    (F + κI)⁻¹ r = (1/κ) (r − Gᵀ (K + BκI)⁻¹ G r).

Each function here is one of those pieces; :meth:`.NGD.step` chains them.

Reference: Ren & Goldfarb (2019), "Efficient subsampled Gauss-Newton and natural gradient methods
for training neural networks", arXiv:1906.02353.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .sample_space import SampleGradients

__all__ = [
    "DAMPINGS",
    "damping_kappa",
    "empirical_span_coefficients",
    "relative_norm",
    "spd_solver",
    "span_direction",
    "span_direction_parts",
    "span_mismatch",
    "true_span_coefficients",
    "woodbury_remainder",
]

#: Damping modes of :func:`damping_kappa`.
DAMPINGS = ("per_parameter", "per_sample")

Solver = Callable[[Tensor], Tensor]


def damping_kappa(
    mode: str, alpha: float, fisher_trace: float, eps: float, dim: int, num_pseudo: int
) -> float:
    """The damping κ of ``(F + κI)⁻¹ g``.

    ``"per_parameter"`` (the formula of seed 002 read over all parameters)::

        κ = α · max(tr F, ε) / d,

    α times the mean of **all** d eigenvalues of F. With ``N ≪ d`` pseudo-samples F has at most N
    nonzero eigenvalues, so this is α·N/d of their mean: the step is nearly undamped on the span.

    ``"per_sample"``::

        κ = α · max(tr F, ε) / N,

    α times the mean **nonzero** eigenvalue (exactly so when F has rank N, the generic case for
    N < d; an upper bound on the mean otherwise). α keeps the meaning the formula intends: α = 1
    damps by the typical curvature of the span, α → ∞ gives SGD with step lr/κ, α → 0 the
    undamped natural gradient.
    """
    if mode == "per_parameter":
        scale = dim
    elif mode == "per_sample":
        scale = num_pseudo
    else:
        raise ValueError(f"unknown damping mode {mode!r}; expected one of {DAMPINGS}")
    return alpha * max(fisher_trace, eps) / scale


def empirical_span_coefficients(batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``v`` with ``g = Gᵀv`` for the empirical Fisher: the mean gradient, ``v_i = 1/B``."""
    return torch.full((batch,), 1.0 / batch, dtype=dtype, device=device)


def true_span_coefficients(output_grad: Tensor, fisher_chol: Tensor, keep: Tensor) -> Tensor:
    """``v`` with ``g = Gᵀv`` for the true-Fisher pseudo-samples, float64, ``(R·B,)``.

    The mean-loss gradient is ``g = Σ_i J_iᵀ δ_i`` with ``δ_i = (p_i − y_i)/B`` summing to zero.
    The pseudo-sample cotangents of input i are the columns of ``Mᵀ L_i`` (``L_i Lᵢᵀ = diag q_i −
    q_i q_iᵀ``, ``q_i`` = p_i without its reference class, ``M`` drops that class and subtracts it
    from the others). Since δ_i sums to zero, ``δ_i = Mᵀ y_i`` with ``y_i`` = δ_i without the
    reference entry, so ``δ_i = Mᵀ L_i (L_i⁻¹ y_i)`` and ``v_{r,i} = (L_i⁻¹ y_i)_r``.

    Parameters
    ----------
    output_grad : Tensor
        ``(B, C)`` gradient of the mean loss with respect to the logits (the δ_i).
    fisher_chol : Tensor
        ``(B, C−1, C−1)`` lower Cholesky factors ``L_i``.
    keep : Tensor
        ``(B, C)`` boolean mask of the non-reference classes.
    """
    batch = output_grad.shape[0]
    y = output_grad.double()[keep].view(batch, -1, 1)
    v = torch.linalg.solve_triangular(fisher_chol.double(), y, upper=False)
    return v[..., 0].T.reshape(-1)


def spd_solver(system: Tensor, shift: float) -> tuple[Solver, str]:
    """Solver for the SPD ``system = K + shift·I`` stored as its lower (block) triangle.

    Cholesky in the precision of ``system``: a float32 Gram matrix is only float32-accurate, so
    factorizing it in float32 (twice as fast) loses nothing. If that breaks down (κ so small that
    cond·ε₃₂ ≳ 1) the factorization is redone in float64; if even that fails through rounding, an
    eigendecomposition with the spectrum clamped at ``shift`` (the exact matrix has no
    eigenvalue below it) is used. Only lower triangles are read. Solutions come back as float64.

    Returns
    -------
    (solve, precision)
        ``solve(rhs (N, J)) → (N, J)`` float64, and ``"float32"``, ``"float64"`` or
        ``"float64-eigh"``.
    """
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:

        def solve(rhs: Tensor) -> Tensor:
            # Two triangular solves; cholesky_solve copies the factor on CPU.
            half = torch.linalg.solve_triangular(chol, rhs.to(chol.dtype), upper=False)
            return torch.linalg.solve_triangular(chol.mT, half, upper=True).double()

        return solve, str(system.dtype).removeprefix("torch.")
    if system.dtype != torch.float64:
        return spd_solver(system.double(), shift)
    evals, evecs = torch.linalg.eigh(system)  # reads the lower triangle too
    evals = evals.clamp_min(shift)
    return (lambda rhs: evecs @ ((evecs.T @ rhs.double()) / evals[:, None])), "float64-eigh"


def span_direction(samples: SampleGradients, solve: Solver, v: Tensor) -> Tensor:
    """``Δ_span = B · Gᵀ (K + BκI)⁻¹ v`` (d,), ``solve`` the solver of ``K + BκI``."""
    coeff = samples.batch * solve(v[:, None])
    return samples.transpose_times(coeff)[0]


def span_direction_parts(samples: SampleGradients, solve: Solver, v: Tensor) -> list[Tensor]:
    """:func:`span_direction` as one tensor per parameter (layout order, parameter shapes)."""
    coeff = samples.batch * solve(v[:, None])
    return samples.transpose_times_parts(coeff[:, 0])


def woodbury_remainder(
    samples: SampleGradients, solve: Solver, residual: Tensor, kappa: float
) -> Tensor:
    """``(F + κI)⁻¹ r = (r − Gᵀ (K + BκI)⁻¹ G r) / κ`` (d,) for a remainder ``r`` off the span."""
    w = solve(samples.times(residual)[:, None])
    return (residual - samples.transpose_times(w)[0]) / kappa


def span_mismatch(grad_sq: float, span_sq: float) -> float:
    """``|‖g‖² − ‖Gᵀv‖²| / ‖g‖²``: zero iff ``g = Gᵀv`` up to a part orthogonal to ``g``."""
    if not grad_sq > 0:
        return 0.0
    return abs(grad_sq - span_sq) / grad_sq


def relative_norm(x: Tensor, ref_sq: float) -> float:
    """``‖x‖ / √ref_sq`` (0 when ``ref_sq`` is 0)."""
    return float(x.norm()) / math.sqrt(ref_sq) if ref_sq > 0 else 0.0
