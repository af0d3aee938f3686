"""The duck-typed operator protocol every estimator accepts, and the SciPy bridge.

An *operator* is any object with

- ``dim`` (int): the side length ``d`` of the symmetric matrix ``A`` it represents;
- ``matvec(v)``: ``A @ v`` for a tensor ``v`` of shape ``(d,)``;
- optionally ``matmat(V)``: ``A @ V`` for ``V`` of shape ``(d, k)`` (probes as columns); when
  absent the estimators loop over columns;
- optionally ``dtype`` / ``device``: where probe vectors are created (default float64 on CPU).

:class:`~lightning_curvature.curvature.HessianOperator` and
:class:`~lightning_curvature.curvature.GGNOperator` implement it; :class:`DenseOperator` wraps an
explicit matrix (useful for synthetic spectra and tests of estimators).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "apply_matmat",
    "operator_device",
    "operator_dtype",
    "to_scipy",
]


@runtime_checkable
class CurvatureOperator(Protocol):
    """What an estimator needs: ``dim`` and ``matvec``; ``matmat``/``dtype``/``device`` optional."""

    dim: int

    def matvec(self, v: Tensor) -> Tensor: ...


def operator_dtype(op: Any) -> torch.dtype:
    """The operator's dtype, float64 when it does not say."""
    return getattr(op, "dtype", None) or torch.float64


def operator_device(op: Any) -> torch.device:
    """The operator's device, CPU when it does not say."""
    device = getattr(op, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def check_operator(op: Any) -> int:
    """Validate the protocol and return ``dim``."""
    dim = getattr(op, "dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"op.dim must be a positive int, got {dim!r}")
    if not callable(getattr(op, "matvec", None)):
        raise ValueError("op must have a matvec(v) method")
    return dim


def apply_matmat(op: Any, matrix: Tensor) -> Tensor:
    """``A @ V`` through ``op.matmat`` when the operator has one, else column by column."""
    matmat = getattr(op, "matmat", None)
    if callable(matmat):
        return matmat(matrix)
    return torch.stack([op.matvec(matrix[:, j]) for j in range(matrix.shape[1])], dim=1)


class DenseOperator:
    """An explicit symmetric matrix behind the operator protocol (counts its products).

    Parameters
    ----------
    matrix : Tensor
        Square ``(d, d)`` matrix; symmetry is the caller's responsibility.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.num_matvecs += 1
        return self.matrix @ v.to(self.matrix)

    def matmat(self, matrix: Tensor) -> Tensor:
        self.num_matvecs += int(matrix.shape[1])
        return self.matrix @ matrix.to(self.matrix)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def to_scipy(self) -> Any:
        return to_scipy(self)


def to_scipy(op: Any) -> Any:
    """A ``scipy.sparse.linalg.LinearOperator`` over ``op`` (float64 numpy in and out).

    Vectors are converted to the operator's dtype/device for each product and back, so SciPy's
    solvers (``eigsh``, ``cg``, ...) can run on a model's Hessian.
    """
    from scipy.sparse.linalg import LinearOperator

    dim = check_operator(op)
    dtype, device = operator_dtype(op), operator_device(op)

    def _matvec(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1))
        out = op.matvec(v.to(device=device, dtype=dtype))
        return out.detach().to("cpu", torch.float64).numpy()

    def _matmat(x: np.ndarray) -> np.ndarray:
        m = torch.as_tensor(np.asarray(x, dtype=np.float64))
        out = apply_matmat(op, m.to(device=device, dtype=dtype))
        return out.detach().to("cpu", torch.float64).numpy()

    return LinearOperator(
        (dim, dim),
        matvec=_matvec,
        rmatvec=_matvec,
        matmat=_matmat,
        rmatmat=_matmat,
        dtype=np.float64,
    )
