"""Stochastic trace estimation: Hutchinson and Hutch++.

Hutchinson (*A stochastic estimator of the trace of the influence matrix*, 1989): for Rademacher
``z``, ``E[zᵀAz] = tr A`` and ``Var[zᵀAz] = 2(‖A‖_F² − Σ A_ii²)``; the mean of ``m`` probes has
standard error ``s/√m`` with ``s`` the sample standard deviation of the terms.

Hutch++ (Meyer, Musco, Musco & Woodruff, *Hutch++: Optimal stochastic trace estimation*, SOSA
2021): with ``m`` products, sketch ``Q = orth(A S)`` from ``m/3`` probes, take ``tr(QᵀAQ)`` exactly
(``m/3`` products) and Hutchinson on the deflated ``(I − QQᵀ)A(I − QQᵀ)`` with the remaining
products. When the spectrum decays, the top eigen-directions that dominate Hutchinson's variance
are removed, and the error falls like ``1/m`` instead of ``1/√m``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from ..checks import check_int
from .blocks import Block, block_sums, resolve_blocks
from .operators import CurvatureOperator, OperatorLike, as_operator
from .probes import as_generator, rademacher
from .results import BlockTrace, LanczosResult, TraceEstimate

__all__ = ["hutchinson_trace", "hutchpp_trace", "krylov_deflated_trace"]


def _blocked_matmat(op: CurvatureOperator, matrix: Tensor, block_size: int | None) -> Tensor:
    """``A @ V``, ``block_size`` columns per ``matmat`` call (all at once when ``None``)."""
    if block_size is None or matrix.shape[1] <= block_size:
        return op.matmat(matrix)
    parts = [
        op.matmat(matrix[:, s : s + block_size]) for s in range(0, matrix.shape[1], block_size)
    ]
    return torch.cat(parts, dim=1)


def _mean_and_stderr(terms: Tensor) -> tuple[float, float]:
    n = terms.numel()
    mean = float(terms.mean())
    return mean, (float(terms.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf)


def _block_traces(
    blocks: Sequence[Block], exact: Tensor | None, terms: Tensor
) -> tuple[BlockTrace, ...]:
    """Per-block estimates: an exact part (or none) plus the mean of per-probe block terms."""
    out = []
    for b, (name, start, stop) in enumerate(blocks):
        mean, stderr = _mean_and_stderr(terms[b])
        base = 0.0 if exact is None else float(exact[b])
        out.append(BlockTrace(name, base + mean, stderr, start, stop))
    return tuple(out)


def hutchinson_trace(
    op: OperatorLike,
    num_probes: int = 100,
    *,
    generator: torch.Generator | int | None = None,
    block_size: int | None = None,
    blocks: Sequence[Block] | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate ``(1/m) Σ zᵢᵀAzᵢ`` of ``tr A`` with Rademacher probes.

    The same products give the trace of every diagonal block ``A_bb``: for Rademacher ``z``,
    ``E[z_bᵀ(Az)_b] = Σ_{i∈b} Σ_j A_ij E[z_i z_j] = tr A_bb``; the block terms of one probe sum
    to its full term, so the block estimates sum to the full estimate.

    Parameters
    ----------
    op : operator
        A :class:`~lightning_curvature.curvature.CurvatureOperator` or any object with ``dim``
        and ``matvec`` (``matmat`` used when present).
    num_probes : int
        Number of probes ``m >= 2`` (two are needed for a standard error).
    generator : torch.Generator or int, optional
        Source of the probes (a seed makes one; ``None`` draws a fresh seed).
    block_size : int, optional
        Probes per ``matmat`` call (bounds memory); default all at once.
    blocks : sequence of (name, start, stop), optional
        Coordinate blocks for per-block traces; default one per parameter tensor when the
        operator has a ``layout`` (none otherwise); ``()`` for none.

    Returns
    -------
    TraceEstimate
        ``stderr = s/√m`` with ``s`` the sample standard deviation of the ``zᵢᵀAzᵢ``;
        ``blocks`` the per-block estimates with their own standard errors.
    """
    check_int("num_probes", num_probes, minimum=2)
    check_int("block_size", block_size, minimum=1, allow_none=True)
    base = as_operator(op)
    parts = resolve_blocks(base, blocks)
    start = time.perf_counter()
    gen = as_generator(generator)
    probes = rademacher(base.dim, num_probes, gen, base.dtype, base.device)
    products = (probes * _blocked_matmat(base, probes, block_size)).to(torch.float64)
    value, stderr = _mean_and_stderr(products.sum(dim=0).cpu())
    per_block = _block_traces(parts, None, block_sums(products, parts))
    return TraceEstimate(
        value, stderr, num_probes, time.perf_counter() - start, num_probes, per_block
    )


def hutchpp_trace(
    op: OperatorLike,
    num_matvecs: int = 100,
    *,
    generator: torch.Generator | int | None = None,
    block_size: int | None = None,
    blocks: Sequence[Block] | None = None,
) -> TraceEstimate:
    """Hutch++ estimate ``tr(QᵀAQ) + (1/g) Σ zᵢᵀ(I−QQᵀ)A(I−QQᵀ)zᵢ`` of ``tr A``.

    Per block ``b`` (``P = QQᵀ``, ``A = PAP + PA(I−P) + (I−P)AP + (I−P)A(I−P)``) the first
    three terms' block traces are exact from ``AQ``: ``tr_b(PAP) = Σ_{i∈b} (Q QᵀAQ)_i·Q_i`` and
    ``tr_b(PA(I−P)) = tr_b((I−P)AP) = Σ_{i∈b} ((I−P)AQ)_i·Q_i`` (rows ``i`` of the ``(d, s)``
    matrices); the last one is Hutchinson's with the same probes,
    ``E[z_bᵀ((I−P)A(I−P)z)_b] = tr_b((I−P)A(I−P))``. The cross terms cancel in the sum, so the
    blocks add up to the full estimate.

    Parameters
    ----------
    op : operator
        A :class:`~lightning_curvature.curvature.CurvatureOperator` or any object with ``dim``
        and ``matvec`` (``matmat`` used when present).
    num_matvecs : int
        Total products ``m >= 4``: ``s = m // 3`` for the sketch, ``s`` for ``QᵀAQ`` and
        ``g = m − 2s`` Hutchinson probes (``s`` is capped at ``dim``).
    generator : torch.Generator or int, optional
        Source of the probes.
    block_size : int, optional
        Columns per ``matmat`` call.
    blocks : sequence of (name, start, stop), optional
        As :func:`hutchinson_trace`.

    Returns
    -------
    TraceEstimate
        ``stderr`` is the standard error of the Hutchinson part only (the deflated trace is exact
        for the drawn sketch); ``num_probes = g``; ``blocks`` per-block estimates, whose standard
        errors are likewise those of their Hutchinson parts.
    """
    check_int("num_matvecs", num_matvecs, minimum=4)
    check_int("block_size", block_size, minimum=1, allow_none=True)
    base = as_operator(op)
    parts = resolve_blocks(base, blocks)
    dim, dtype, device = base.dim, base.dtype, base.device
    start = time.perf_counter()
    gen = as_generator(generator)
    sketch_size = min(num_matvecs // 3, dim)
    num_probes = num_matvecs - 2 * sketch_size
    sketch = rademacher(dim, sketch_size, gen, dtype, device)
    image = _blocked_matmat(base, sketch, block_size)
    # Orthonormalize in float64: a float32 QR of a badly conditioned sketch loses orthogonality,
    # and then tr(QᵀAQ) double counts.
    q, _ = torch.linalg.qr(image.to(torch.float64))
    probes = rademacher(dim, num_probes, gen, torch.float64, device)
    deflated = probes - q @ (q.T @ probes)
    # Q and the deflated probes are both known now: one block of s + g columns.
    both = _blocked_matmat(base, torch.cat([q, deflated], dim=1).to(dtype), block_size)
    aq, a_deflated = both.to(torch.float64).split([q.shape[1], num_probes], dim=1)
    low_rank = float((q * aq).sum())
    rest, stderr = _mean_and_stderr((deflated * a_deflated).sum(dim=0).cpu())
    per_block: tuple[BlockTrace, ...] = ()
    if parts:
        proj = q.T @ aq
        proj = (proj + proj.T) / 2
        q_proj = q @ proj
        exact = block_sums(q_proj * q, parts).sum(dim=1)
        exact += 2 * block_sums((aq - q_proj) * q, parts).sum(dim=1)
        outside = a_deflated - q @ (q.T @ a_deflated)
        per_block = _block_traces(parts, exact, block_sums(probes * outside, parts))
    return TraceEstimate(
        low_rank + rest, stderr, 2 * sketch_size + num_probes, time.perf_counter() - start,
        num_probes, per_block,
    )  # fmt: skip


def krylov_deflated_trace(
    op: OperatorLike,
    run: LanczosResult,
    num_probes: int,
    generator: torch.Generator | int | None = None,
    *,
    blocks: Sequence[Block] | None = None,
    block_size: int | None = None,
) -> TraceEstimate:
    r"""``tr A = tr(T_k) + tr(P A P)``: exact on a Lanczos run's Krylov space, Hutchinson elsewhere.

    With ``Q = Q_k`` the orthonormal basis of a Lanczos run (drawn independently of the probes)
    and ``P = I − QQᵀ``, ``tr A = tr(QᵀAQ) + tr(PAP)`` exactly, and ``tr(QᵀAQ) = Σ α_j`` is known
    from the run; the remainder is estimated by Hutchinson with ``num_probes`` Rademacher probes
    ``z`` (terms ``zᵀPAPz``, one product each): unbiased, with the standard error of those terms.
    This is Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with the sketch replaced by the Krylov
    space, which captures the dominant eigenvectors better for the same products ("Krylov-aware"
    trace estimation, Chen & Hallman 2023), and costs nothing extra when an eigenvalue run needs
    the basis anyway.

    **Per block** ``b`` (coordinates ``i ∈ b``, ``tr_b M = Σ_{i∈b} M_ii``) the cross terms of
    ``A = QQᵀAQQᵀ + QQᵀAP + PAQQᵀ + PAP`` no longer cancel:

    ``tr_b A = Σ_{i∈b} (Q T_k)_i·Q_i + 2 Σ_{i∈b} (PAQ)_i·Q_i + tr_b(PAP)``.

    The first term is exact from the run (rows of ``Q`` restricted to ``b``, weighted by
    ``T_k``). By the Lanczos relation ``AQ = QT_k + β_k q_{k+1} e_kᵀ`` only the last column of
    ``PAQ`` is nonzero, ``PAq_k = β_k q_{k+1}``: one more product (``A q_k``, taken in the same
    block as the probes) makes the second term exact. The third is Hutchinson's with the same
    probes, ``E[z_bᵀ(PAPz)_b] = tr_b(PAP)`` for Rademacher ``z``, whose per-probe block terms
    sum to the full terms. The cross terms sum to ``2 q_kᵀPAq_k = 0`` and
    ``Σ_b Σ_{i∈b} (QT_k)_i·Q_i = tr(QᵀQ T_k) = Σ α_j``, so the blocks add up to the full
    estimate (to the rounding of ``QᵀQ = I``). Without the cross terms each block would be
    biased (the test shows it).

    Parameters
    ----------
    op : operator
        The matrix ``A`` of the run.
    run : LanczosResult
        A run on ``op`` that kept its basis (``run.basis`` not None).
    num_probes : int
        Hutchinson probes on the deflated remainder (>= 2 for a standard error).
    generator : torch.Generator or int, optional
        Probe randomness.
    blocks : sequence of (name, start, stop), optional
        Coordinate blocks for per-block traces; default one per parameter tensor when the
        operator has a ``layout`` (none otherwise); ``()`` for none (and no extra product).
    block_size : int, optional
        Columns per ``matmat`` call; default all at once.

    Returns
    -------
    TraceEstimate
        ``stderr`` of the Hutchinson part; ``num_matvecs = num_probes`` plus one when blocks
        are computed on a run that did not end on an invariant subspace (``A q_k``); ``blocks``
        per-block estimates with the standard errors of their Hutchinson parts.
    """
    if run.basis is None:
        raise ValueError("`run` must keep its Lanczos basis (run.basis is None)")
    num_probes = check_int("num_probes", num_probes, minimum=1)  # type: ignore[assignment]
    check_int("block_size", block_size, minimum=1, allow_none=True)
    base = as_operator(op)
    if run.basis.dim() != 2 or run.basis.shape[0] != base.dim:
        raise ValueError(
            f"`run.basis` must have shape ({base.dim}, k), got {tuple(run.basis.shape)}"
        )
    parts = resolve_blocks(base, blocks)
    start = time.perf_counter()
    gen = as_generator(generator)
    if parts:
        rest, stderr, per_block, extra = _krylov_rest_by_block(
            base, run, num_probes, gen, parts, block_size
        )
    else:
        rest, stderr = _krylov_rest(base, run, num_probes, gen, block_size)
        per_block, extra = (), 0
    return TraceEstimate(
        value=float(run.alphas.sum()) + rest,
        stderr=stderr,
        num_matvecs=num_probes + extra,
        seconds=time.perf_counter() - start,
        num_probes=num_probes,
        blocks=per_block,
    )


def _krylov_rest(
    base: CurvatureOperator,
    run: LanczosResult,
    num_probes: int,
    gen: torch.Generator,
    block_size: int | None,
) -> tuple[float, float]:
    """Hutchinson on ``PAP`` as ``(Pz)ᵀA(Pz)``: one projection, in the operator's dtype.

    ``zᵀPAPz = (Pz)ᵀA(Pz)`` for the symmetric projector ``P``, so the image needs no second
    projection. Rounding leaves a Krylov component of relative size ``ε`` in ``Pz``; in the sum
    over all coordinates it changes a term by ``O(ε)`` relative (the block terms, which it
    would bias, take the float64 route of :func:`_krylov_rest_by_block`). Terms are summed
    in float64.
    """
    q = run.basis.to(device=base.device, dtype=base.dtype)
    probes = rademacher(base.dim, num_probes, gen, base.dtype, base.device)
    deflated = probes - q @ (q.T @ probes)
    images = _blocked_matmat(base, deflated, block_size)
    terms = (deflated * images).sum(dim=0, dtype=torch.float64)
    return _mean_and_stderr(terms.cpu())


def _krylov_rest_by_block(
    base: CurvatureOperator,
    run: LanczosResult,
    num_probes: int,
    gen: torch.Generator,
    parts: Sequence[Block],
    block_size: int | None,
) -> tuple[float, float, tuple[BlockTrace, ...], int]:
    """Hutchinson on ``PAP`` with the per-block terms and the exact Krylov parts of each block.

    Returns the estimate of ``tr(PAP)``, its stderr, the blocks and the extra products taken
    (1 for ``A q_k`` when the run did not end on an invariant subspace, else 0).
    """
    assert run.basis is not None
    # Projections in float64: P = I − QQᵀ applied in float32 leaves a Krylov component of the
    # size of the rounding, which the block terms would pick up.
    q = run.basis.to(device=base.device, dtype=torch.float64)
    probes = rademacher(base.dim, num_probes, gen, torch.float64, base.device)
    columns = [probes - q @ (q.T @ probes)]
    # β_k q_{k+1} = P A q_k, the only nonzero column of PAQ (none on an invariant subspace).
    cross = run.residual_norm > 0 and q.shape[1] < base.dim
    if cross:
        columns.append(q[:, -1:])
    images = _blocked_matmat(base, torch.cat(columns, dim=1).to(base.dtype), block_size)
    images = images.to(torch.float64)
    outside = images[:, :num_probes]
    outside = outside - q @ (q.T @ outside)  # P A P z
    terms = probes * outside
    rest, stderr = _mean_and_stderr(terms.sum(dim=0).cpu())
    t = run.tridiagonal().to(q.device)
    exact = block_sums((q @ t) * q, parts).sum(dim=1)
    if cross:
        last = images[:, num_probes:]
        exact += 2 * block_sums((last - q @ (q.T @ last)) * q[:, -1:], parts).sum(dim=1)
    return rest, stderr, _block_traces(parts, exact, block_sums(terms, parts)), int(cross)
