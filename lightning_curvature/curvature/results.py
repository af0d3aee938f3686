"""Result dataclasses of the engine: estimate, uncertainty, cost and convergence flags."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BlockTrace",
    "ExtremeEigenpairs",
    "LanczosResult",
    "OppositeSignEigenpair",
    "SpectralDensity",
    "SpectralIndex",
    "TraceEstimate",
]


@dataclass(frozen=True)
class BlockTrace:
    """The trace of one diagonal block ``A_bb`` (coordinates ``start:stop``).

    Attributes
    ----------
    name : str
        The block's name (a parameter tensor's name in ``model.named_parameters()``).
    value, stderr : float
        Estimate of ``tr A_bb`` and its standard error (stochastic part, as the full estimate's).
    start, stop : int
        Its coordinates in the flat vector.
    """

    name: str
    value: float
    stderr: float
    start: int
    stop: int


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate.

    Attributes
    ----------
    value : float
        Estimate of ``tr A``.
    stderr : float
        Standard error of ``value`` from the spread of the per-probe terms (for Hutch++, of its
        stochastic part; the deflated part ``tr(QᵀAQ)`` is exact for the drawn sketch).
    num_matvecs : int
        Operator products used.
    seconds : float
        Wall time.
    num_probes : int
        Probe vectors in the stochastic (Hutchinson) part.
    blocks : tuple of BlockTrace
        Per-block traces from the same products (one per parameter tensor by default); their
        values sum to ``value`` up to rounding. Empty when the operator has no layout.
    """

    value: float
    stderr: float
    num_matvecs: int
    seconds: float
    num_probes: int = 0
    blocks: tuple[BlockTrace, ...] = ()

    def block_values(self) -> dict[str, float]:
        """``{name: tr A_bb}`` of :attr:`blocks` (e.g. to log ``curvature/trace_layer/<name>``)."""
        return {b.name: b.value for b in self.blocks}

    def relative_stderr(self) -> float:
        """``stderr / |value|`` (``inf`` for a zero estimate)."""
        return self.stderr / abs(self.value) if self.value != 0 else math.inf


@dataclass(frozen=True)
class LanczosResult:
    """``k`` steps of Lanczos: ``A Q_k = Q_k T_k + β_k q_{k+1} e_kᵀ``.

    Attributes
    ----------
    alphas : Tensor
        Diagonal of ``T_k`` (float64, CPU), length ``k``.
    betas : Tensor
        Off-diagonal of ``T_k`` (float64, CPU), length ``k - 1``.
    basis : Tensor or None
        ``Q_k`` as a ``(dim, k)`` tensor in the operator's dtype/device (``None`` if not kept).
    residual_norm : float
        ``β_k``, the norm of the unnormalized next Lanczos vector (0 on an invariant subspace).
    num_matvecs : int
        Operator products used.
    seconds : float
        Wall time.
    """

    alphas: Tensor
    betas: Tensor
    basis: Tensor | None
    residual_norm: float
    num_matvecs: int
    seconds: float

    @property
    def num_iters(self) -> int:
        return int(self.alphas.shape[0])

    def tridiagonal(self) -> Tensor:
        """The symmetric tridiagonal ``T_k`` (float64)."""
        t = torch.diag(self.alphas)
        if self.betas.numel():
            t = t + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)
        return t

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and the eigenvectors ``S`` of ``T_k`` (float64)."""
        return torch.linalg.eigh(self.tridiagonal())


@dataclass(frozen=True)
class ExtremeEigenpairs:
    """The most positive and most negative eigenpairs of a symmetric operator.

    Attributes
    ----------
    lambda_max, lambda_min : float
        Largest and smallest (most negative) eigenvalue estimates (Ritz values).
    v_max, v_min : Tensor
        Unit-norm Ritz vectors, flat, in the operator's dtype/device.
    residual_max, residual_min : float
        ``‖A v − λ v‖`` of each pair, computed with explicit products after the iteration (not
        the Lanczos recurrence's estimate).
    converged : bool
        Both residuals ``<= tol · max(|λ_max|, |λ_min|)``.
    num_matvecs : int
        Operator products used (including the two residual checks).
    seconds : float
        Wall time.
    num_restarts : int
        Thick restarts performed.
    """

    lambda_max: float
    lambda_min: float
    v_max: Tensor
    v_min: Tensor
    residual_max: float
    residual_min: float
    converged: bool
    num_matvecs: int
    seconds: float
    num_restarts: int = 0

    @property
    def spectral_norm(self) -> float:
        return max(abs(self.lambda_max), abs(self.lambda_min))


@dataclass(frozen=True)
class OppositeSignEigenpair:
    """Result of the annihilation (spectrum-shift) method.

    Attributes
    ----------
    eigenvalue : float
        The eigenvalue at the end of the spectrum opposite to the given one.
    eigenvector : Tensor
        Unit-norm eigenvector estimate.
    residual : float
        ``‖A v − λ v‖`` (explicit product).
    converged : bool
        The power iteration met its tolerance.
    num_matvecs : int
        Operator products used.
    seconds : float
        Wall time.
    """

    eigenvalue: float
    eigenvector: Tensor
    residual: float
    converged: bool
    num_matvecs: int
    seconds: float


@dataclass(frozen=True)
class SpectralIndex:
    """The fraction of eigenvalues below ``−τ`` (the Hessian index density), from SLQ.

    Attributes
    ----------
    value : float
        Quadrature mass of the Ritz values below ``−tau``.
    stderr : float
        Standard error over the independent runs.
    tau : float
        The resolution used.
    num_runs : int
        Runs averaged.
    """

    value: float
    stderr: float
    tau: float
    num_runs: int


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the eigenvalue density of ``A``.

    The density is ``φ(t) = (1/R) Σ_r Σ_i w_{r,i} N(t; θ_{r,i}, σ²)``: Gaussian-broadened
    quadrature nodes ``θ`` (Ritz values) with weights ``w`` (squared first components of the
    eigenvectors of ``T``), averaged over ``R`` random starts. It integrates to one.

    Attributes
    ----------
    grid : Tensor
        Points ``t`` (float64).
    density : Tensor
        ``φ(t)`` on ``grid``.
    nodes : Tensor
        ``(R, k)`` Ritz values per run (float64).
    weights : Tensor
        ``(R, k)`` quadrature weights per run; each row sums to one.
    sigma : float
        Broadening width.
    num_matvecs : int
        Operator products used.
    seconds : float
        Wall time.
    dim : int
        Operator dimension (``d``), to turn moments into traces.
    tau : float
        Resolution of the index (:meth:`index`): Ritz values in ``[−τ, 0)`` are not counted as
        negative. The largest Ritz residual ``r_j`` of a node with ``|θ_j| <= r_j`` (a node
        whose sign the run leaves open), at least ``√ε · max|θ|`` (``ε`` the operator dtype's
        machine epsilon, the rounding of the products).
    residuals : Tensor or None
        ``(R, k)`` Ritz residual bounds ``β_k |s_kj|`` of the nodes (a true eigenvalue lies
        within ``r_j`` of ``θ_j``).
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int = 0
    seconds: float = 0.0
    dim: int = 0
    tau: float = 0.0
    residuals: Tensor | None = None

    def index(self, tau: float | None = None) -> SpectralIndex:
        """The Hessian index: quadrature mass of the Ritz values below ``−τ``.

        ``(1/R) Σ_r Σ_j w_{r,j} [θ_{r,j} < −τ]``, the SLQ estimate of the fraction of
        eigenvalues below ``−τ`` (the unbroadened nodes: the Gaussian broadening of the picture
        would put half of any near-zero bulk below zero). Its standard error is the spread over
        the ``R`` independent runs.

        Parameters
        ----------
        tau : float, optional
            Resolution ``>= 0``; default :attr:`tau`, the one derived from the run.
        """
        tau = self.tau if tau is None else float(tau)
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"`tau` must be a finite number >= 0, got {tau!r}")
        per_run = (self.weights * (self.nodes < -tau).to(self.weights.dtype)).sum(dim=1)
        runs = per_run.numel()
        stderr = float(per_run.std() / math.sqrt(runs)) if runs > 1 else math.inf
        return SpectralIndex(float(per_run.mean()), stderr, tau, runs)

    def negative_fraction(self, threshold: float = 0.0) -> float:
        """Mass of the *broadened* density below ``threshold`` (for pictures; see :meth:`index`).

        Computed in closed form, ``(1/R) Σ w Φ((threshold − θ)/σ)``, not by summing grid cells.
        With the default ``σ`` a near-zero bulk is split in half by the broadening, so this is
        not the index; :meth:`index` is.
        """
        z = (threshold - self.nodes) / (self.sigma * math.sqrt(2.0))
        cdf = 0.5 * (1.0 + torch.erf(z))
        return float((self.weights * cdf).sum(dim=1).mean())

    def moment(self, order: int = 1) -> float:
        """Quadrature estimate of ``(1/d) tr(A^order)`` (unbroadened nodes)."""
        return float((self.weights * self.nodes**order).sum(dim=1).mean())

    def moment_stderr(self, order: int = 1) -> float:
        """Standard error of :meth:`moment` over the independent runs."""
        per_run = (self.weights * self.nodes**order).sum(dim=1)
        if per_run.numel() < 2:
            return math.inf
        return float(per_run.std() / math.sqrt(per_run.numel()))

    def trace_estimate(self) -> float:
        """``d · moment(1)``: the SLQ estimate of ``tr A``."""
        return self.dim * self.moment(1)
