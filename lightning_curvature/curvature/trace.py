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
from typing import Any

import torch
from torch import Tensor

from .operators import apply_matmat, check_operator, operator_device, operator_dtype
from .probes import as_generator, rademacher
from .results import TraceEstimate

__all__ = ["hutchinson_trace", "hutchpp_trace"]


def _check_block(block_size: int | None) -> None:
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1 or None, got {block_size}")


def _quadratic_forms(op: Any, probes: Tensor, block_size: int | None) -> Tensor:
    """``zᵀAz`` for each column ``z`` of ``probes`` (float64), ``block_size`` columns at a time."""
    k = probes.shape[1]
    step = k if block_size is None else block_size
    out = []
    for start in range(0, k, step):
        block = probes[:, start : start + step]
        out.append((block * apply_matmat(op, block)).to(torch.float64).sum(dim=0))
    return torch.cat(out).cpu()


def _mean_and_stderr(terms: Tensor) -> tuple[float, float]:
    n = terms.numel()
    mean = float(terms.mean())
    return mean, (float(terms.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf)


def hutchinson_trace(
    op: Any,
    num_probes: int = 100,
    *,
    generator: torch.Generator | int | None = None,
    block_size: int | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate ``(1/m) Σ zᵢᵀAzᵢ`` of ``tr A`` with Rademacher probes.

    Parameters
    ----------
    op : operator
        Any object with ``dim`` and ``matvec`` (``matmat`` used when present).
    num_probes : int
        Number of probes ``m >= 2`` (two are needed for a standard error).
    generator : torch.Generator or int, optional
        Source of the probes (a seed makes one; ``None`` draws a fresh seed).
    block_size : int, optional
        Probes per ``matmat`` call (bounds memory); default all at once.

    Returns
    -------
    TraceEstimate
        ``stderr = s/√m`` with ``s`` the sample standard deviation of the ``zᵢᵀAzᵢ``.
    """
    if not isinstance(num_probes, int) or num_probes < 2:
        raise ValueError(f"num_probes must be an int >= 2, got {num_probes!r}")
    _check_block(block_size)
    dim = check_operator(op)
    start = time.perf_counter()
    gen = as_generator(generator)
    probes = rademacher(dim, num_probes, gen, operator_dtype(op), operator_device(op))
    value, stderr = _mean_and_stderr(_quadratic_forms(op, probes, block_size))
    return TraceEstimate(value, stderr, num_probes, time.perf_counter() - start, num_probes)


def hutchpp_trace(
    op: Any,
    num_matvecs: int = 100,
    *,
    generator: torch.Generator | int | None = None,
    block_size: int | None = None,
) -> TraceEstimate:
    """Hutch++ estimate ``tr(QᵀAQ) + (1/g) Σ zᵢᵀ(I−QQᵀ)A(I−QQᵀ)zᵢ`` of ``tr A``.

    Parameters
    ----------
    op : operator
        Any object with ``dim`` and ``matvec`` (``matmat`` used when present).
    num_matvecs : int
        Total products ``m >= 4``: ``s = m // 3`` for the sketch, ``s`` for ``QᵀAQ`` and
        ``g = m − 2s`` Hutchinson probes (``s`` is capped at ``dim``).
    generator : torch.Generator or int, optional
        Source of the probes.
    block_size : int, optional
        Columns per ``matmat`` call.

    Returns
    -------
    TraceEstimate
        ``stderr`` is the standard error of the Hutchinson part only (the deflated trace is exact
        for the drawn sketch); ``num_probes = g``.
    """
    if not isinstance(num_matvecs, int) or num_matvecs < 4:
        raise ValueError(f"num_matvecs must be an int >= 4, got {num_matvecs!r}")
    _check_block(block_size)
    dim = check_operator(op)
    start = time.perf_counter()
    gen = as_generator(generator)
    dtype, device = operator_dtype(op), operator_device(op)
    sketch_size = min(num_matvecs // 3, dim)
    num_probes = num_matvecs - 2 * sketch_size
    sketch = rademacher(dim, sketch_size, gen, dtype, device)
    image = _blocked_matmat(op, sketch, block_size)
    # Orthonormalize in float64: a float32 QR of a badly conditioned sketch loses orthogonality,
    # and then tr(QᵀAQ) double counts.
    q, _ = torch.linalg.qr(image.to(torch.float64))
    q_op = q.to(dtype)
    low_rank = float((q * _blocked_matmat(op, q_op, block_size).to(torch.float64)).sum())
    probes = rademacher(dim, num_probes, gen, torch.float64, device)
    deflated = probes - q @ (q.T @ probes)
    terms = _quadratic_forms(op, deflated.to(dtype), block_size)
    rest, stderr = _mean_and_stderr(terms)
    return TraceEstimate(
        low_rank + rest, stderr, 2 * sketch_size + num_probes, time.perf_counter() - start,
        num_probes,
    )  # fmt: skip


def _blocked_matmat(op: Any, matrix: Tensor, block_size: int | None) -> Tensor:
    if block_size is None or matrix.shape[1] <= block_size:
        return apply_matmat(op, matrix)
    parts = [
        apply_matmat(op, matrix[:, s : s + block_size])
        for s in range(0, matrix.shape[1], block_size)
    ]
    return torch.cat(parts, dim=1)
