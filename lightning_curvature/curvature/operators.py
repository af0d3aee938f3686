"""One operator base for every symmetric curvature matrix, its composition, and the SciPy bridge.

A subclass of :class:`CurvatureOperator` writes only ``_matmat(V)`` (``A @ V`` for a ``(dim, k)``
block already cast to the operator's dtype and device, ``k >= 1``); the base supplies ``@``,
``matvec``/``matmat`` with flat-vector and shape checks, the product count ``num_matvecs``,
scaling, sums and shifts (``c * A``, ``A + B``, ``A - B``, ``A - λI`` = :meth:`shift`), the
restriction to a block of coordinates (:meth:`restrict`, the sub-matrix ``A[s, s]``) and
:meth:`to_scipy` (a ``scipy.sparse.linalg.LinearOperator``). The design follows curvlinops
(Dangel et al., *curvlinops: linear operators for curvature matrices in PyTorch*).

Estimators (:func:`~lightning_curvature.curvature.hutchpp_trace`, Lanczos, SLQ, ...) are typed
against :class:`OperatorLike`, the structural protocol ``dim`` + ``matvec`` (``matmat``,
``dtype``, ``device``, ``layout`` optional), and turn what they get into a
:class:`CurvatureOperator` with :func:`as_operator`: an engine operator passes through unchanged,
any other object is wrapped once (products forwarded, ``matmat`` looped over columns when the
object has none, float64 on CPU when it does not say).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .params import ParameterLayout

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "IdentityOperator",
    "OperatorLike",
    "RestrictedOperator",
    "ScaledOperator",
    "SumOperator",
    "apply_matmat",
    "as_operator",
    "check_operator",
    "operator_device",
    "operator_dtype",
    "to_scipy",
]


@runtime_checkable
class OperatorLike(Protocol):
    """What an estimator accepts: ``dim`` and ``matvec`` (everything else is optional)."""

    dim: int

    def matvec(self, v: Tensor) -> Tensor: ...


class CurvatureOperator(ABC):
    """A symmetric ``dim x dim`` matrix known through its products.

    Parameters
    ----------
    dim : int
        Side length ``d``.
    dtype, device
        Where products live; inputs are cast to them.
    layout : ParameterLayout, optional
        Names and offsets of parameter blocks when the operator acts on a model's parameters
        (used for per-block traces).

    Attributes
    ----------
    num_matvecs : int
        Products taken through this object (a ``matmat`` with ``k`` columns counts ``k``).
    """

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        layout: ParameterLayout | None = None,
    ) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"`dim` must be a positive integer, got {dim!r}")
        self.dim: int = dim
        self.dtype: torch.dtype = dtype
        self.device: torch.device = torch.device(device)
        self.layout: ParameterLayout | None = layout
        self.num_matvecs: int = 0

    @abstractmethod
    def _matmat(self, matrix: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(dim, k)``, ``k >= 1``, in ``dtype`` on ``device``."""

    # -- products ------------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for a flat vector ``v`` of length ``dim``."""
        if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != self.dim:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"`v` must have shape ({self.dim},), got {shape}")
        self.num_matvecs += 1
        return self._matmat(v.detach().to(self.device, self.dtype)[:, None])[:, 0]

    def matmat(self, matrix: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(dim, k)`` (probes as columns)."""
        if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != self.dim:
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"`V` must have shape ({self.dim}, k), got {shape}")
        k = int(matrix.shape[1])
        if k == 0:
            return torch.zeros(self.dim, 0, dtype=self.dtype, device=self.device)
        self.num_matvecs += k
        return self._matmat(matrix.detach().to(self.device, self.dtype))

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    # -- composition ---------------------------------------------------------------------------
    def __mul__(self, scale: float) -> CurvatureOperator:
        return ScaledOperator(self, scale)

    __rmul__ = __mul__

    def __neg__(self) -> CurvatureOperator:
        return ScaledOperator(self, -1.0)

    def __add__(self, other: CurvatureOperator) -> CurvatureOperator:
        return SumOperator(self, as_operator(other))

    def __sub__(self, other: CurvatureOperator) -> CurvatureOperator:
        return SumOperator(self, as_operator(other), -1.0)

    def shift(self, sigma: float) -> CurvatureOperator:
        """``A − σI`` (the annihilation shift: ``σ = λ₁`` maps ``λ₁``'s eigenvector to zero)."""
        return self - ScaledOperator(IdentityOperator(self.dim, self.dtype, self.device), sigma)

    def restrict(self, start: int, stop: int) -> RestrictedOperator:
        """The principal sub-matrix ``A[start:stop, start:stop]`` as an operator."""
        return RestrictedOperator(self, start, stop)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        return to_scipy(self)

    def to_dense(self) -> Tensor:
        """The full ``dim x dim`` matrix (``dim`` products; small operators only)."""
        return self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))


class DenseOperator(CurvatureOperator):
    """An explicit symmetric matrix behind the operator interface (synthetic spectra, tests).

    Parameters
    ----------
    matrix : Tensor
        Square ``(d, d)`` matrix; symmetry is the caller's responsibility.
    """

    def __init__(self, matrix: Tensor) -> None:
        if (
            not isinstance(matrix, Tensor)
            or matrix.dim() != 2
            or matrix.shape[0] != matrix.shape[1]
        ):
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"`matrix` must be a square 2-D tensor, got shape {shape}")
        super().__init__(int(matrix.shape[0]), matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self.matrix @ matrix

    def to_dense(self) -> Tensor:
        return self.matrix


class IdentityOperator(CurvatureOperator):
    """``I`` of side ``dim`` (a building block of shifts)."""

    def _matmat(self, matrix: Tensor) -> Tensor:
        return matrix


def _same_space(a: CurvatureOperator, b: CurvatureOperator) -> None:
    if a.dim != b.dim:
        raise ValueError(f"operators must have the same `dim`, got {a.dim} and {b.dim}")


class ScaledOperator(CurvatureOperator):
    """``c · A``; its products are counted here and in ``A``."""

    def __init__(self, op: CurvatureOperator, scale: float) -> None:
        super().__init__(op.dim, op.dtype, op.device, op.layout)
        self.op, self.scale = op, float(scale)

    def _matmat(self, matrix: Tensor) -> Tensor:
        return self.scale * self.op.matmat(matrix)


class SumOperator(CurvatureOperator):
    """``A + c · B`` (``c = -1`` for a difference such as the residual ``H − G``)."""

    def __init__(self, a: CurvatureOperator, b: CurvatureOperator, scale: float = 1.0) -> None:
        _same_space(a, b)
        super().__init__(a.dim, a.dtype, a.device, a.layout)
        self.a, self.b, self.scale = a, b, float(scale)

    def _matmat(self, matrix: Tensor) -> Tensor:
        other = self.b.matmat(matrix).to(self.dtype)
        return self.a.matmat(matrix) + self.scale * other


class RestrictedOperator(CurvatureOperator):
    """The principal block ``A[s, s]`` for the coordinates ``s = start:stop``.

    A product pads ``V`` with zeros outside the block, takes one full product and keeps the
    block's rows: ``(A E_s V)_s`` with ``E_s`` the coordinate embedding.
    """

    def __init__(self, op: CurvatureOperator, start: int, stop: int) -> None:
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= op.dim):
            raise ValueError(
                f"`start:stop` must be a non-empty range inside [0, {op.dim}], got {start}:{stop}"
            )
        super().__init__(stop - start, op.dtype, op.device)
        self.op, self.start, self.stop = op, start, stop

    def _matmat(self, matrix: Tensor) -> Tensor:
        full = torch.zeros(self.op.dim, matrix.shape[1], dtype=self.dtype, device=self.device)
        full[self.start : self.stop] = matrix
        return self.op.matmat(full)[self.start : self.stop]


class _WrappedOperator(CurvatureOperator):
    """An :class:`OperatorLike` object behind the base interface (products forwarded)."""

    def __init__(self, op: Any, dim: int) -> None:
        dtype = getattr(op, "dtype", None) or torch.float64
        device = getattr(op, "device", None) or "cpu"
        super().__init__(dim, dtype, device, getattr(op, "layout", None))
        self.op = op
        self._has_matmat = callable(getattr(op, "matmat", None))

    def matvec(self, v: Tensor) -> Tensor:
        # One vector goes to the object's own matvec (it may count calls, or have no matmat).
        if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != self.dim:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"`v` must have shape ({self.dim},), got {shape}")
        self.num_matvecs += 1
        return self.op.matvec(v.detach().to(self.device, self.dtype))

    def _matmat(self, matrix: Tensor) -> Tensor:
        if self._has_matmat:
            return self.op.matmat(matrix)
        return torch.stack([self.op.matvec(matrix[:, j]) for j in range(matrix.shape[1])], dim=1)


def check_operator(op: Any) -> int:
    """Validate the :class:`OperatorLike` protocol and return ``dim``."""
    dim = getattr(op, "dim", None)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"`op.dim` must be a positive integer, got {dim!r}")
    if not callable(getattr(op, "matvec", None)):
        raise ValueError(f"`op` must have a matvec(v) method, got {type(op).__name__}")
    return dim


def as_operator(op: OperatorLike | CurvatureOperator) -> CurvatureOperator:
    """``op`` itself when it is a :class:`CurvatureOperator`, else a forwarding wrapper."""
    if isinstance(op, CurvatureOperator):
        return op
    return _WrappedOperator(op, check_operator(op))


def operator_dtype(op: OperatorLike) -> torch.dtype:
    """The operator's dtype, float64 when it does not say."""
    return as_operator(op).dtype


def operator_device(op: OperatorLike) -> torch.device:
    """The operator's device, CPU when it does not say."""
    return as_operator(op).device


def apply_matmat(op: OperatorLike, matrix: Tensor) -> Tensor:
    """``A @ V`` through the operator base (a column loop for objects without ``matmat``)."""
    return as_operator(op).matmat(matrix)


def to_scipy(op: OperatorLike) -> Any:
    """A ``scipy.sparse.linalg.LinearOperator`` over ``op`` (float64 numpy in and out).

    Vectors are converted to the operator's dtype/device for each product and back, so SciPy's
    solvers (``eigsh``, ``cg``, ...) can run on a model's Hessian.
    """
    from scipy.sparse.linalg import LinearOperator

    base = as_operator(op)

    def _matvec(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1))
        return base.matvec(v).detach().to("cpu", torch.float64).numpy()

    def _matmat(x: np.ndarray) -> np.ndarray:
        m = torch.as_tensor(np.asarray(x, dtype=np.float64))
        return base.matmat(m).detach().to("cpu", torch.float64).numpy()

    return LinearOperator(
        (base.dim, base.dim),
        matvec=_matvec,
        rmatvec=_matvec,
        matmat=_matmat,
        rmatmat=_matmat,
        dtype=np.float64,
    )
