"""Directions in parameter space for loss projections: random (normalized) and Hessian.

Random directions follow Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS
2018): Gaussian entries, then *filter normalization*, which rescales every output filter (a row of
a Linear weight, one output channel of a Conv weight) of the direction to the norm of the same
filter of the weights. Without it, the picture depends on the scale of each layer's weights (a
ReLU network is invariant to rescaling one layer up and the next down, but its loss plot is not).

Hessian directions follow Böttcher & Wheeler, "Visualizing high-dimensional loss landscapes with
Hessian directions" (J. Stat. Mech. 2024): the eigenvectors of the extreme eigenvalues λ_max and
λ_min. Along them the loss is, to second order, ½λ_max a² and ½λ_min a², so a saddle
(λ_min < 0) shows up as a saddle; random directions average the spectrum and usually hide it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curvature.curvature.eigen import extreme_eigenpairs
from lightning_curvature.curvature.params import ParameterLayout
from lightning_curvature.curvature.probes import as_generator
from lightning_curvature.curvature.results import ExtremeEigenpairs

__all__ = ["HessianDirections", "hessian_directions", "random_directions"]

_NORMALIZATIONS = ("filter", "layer", None)
_IGNORE = ("biasbn", None)


def _tiny(t: Tensor) -> float:
    return torch.finfo(t.dtype).tiny


def _rescale(direction: Tensor, weight: Tensor) -> Tensor:
    """The whole block rescaled to the Frobenius norm of ``weight``."""
    return direction * (weight.norm() / direction.norm().clamp_min(_tiny(weight)))


def _normalize_parameter(
    direction: Tensor, weight: Tensor, normalization: str | None, ignore: str | None
) -> Tensor:
    """Rescale one parameter block of a direction (see :func:`random_directions`)."""
    if normalization is None:
        return direction
    if weight.dim() <= 1:
        if ignore == "biasbn":
            return torch.zeros_like(direction)
        # 1-D parameters (biases, norm scales) have one entry per neuron: a "filter" of one
        # number would make |d_i| = |w_i| exactly, i.e. a pure sign flip pattern, so they are
        # normalized as a whole block, for "filter" and "layer" alike.
        return _rescale(direction, weight)
    if normalization == "layer":
        return _rescale(direction, weight)
    # "filter": one row per output unit / output channel (dim 0 of Linear and Conv weights).
    d_rows = direction.reshape(direction.shape[0], -1)
    w_norms = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    d_norms = d_rows.norm(dim=1, keepdim=True).clamp_min(_tiny(weight))
    return (d_rows * (w_norms / d_norms)).reshape(direction.shape)


def random_directions(
    model: nn.Module,
    num: int = 2,
    *,
    normalization: str | None = "filter",
    ignore: str | None = "biasbn",
    orthogonalize: bool = False,
    params: Iterable[Tensor] | Iterable[str] | None = None,
    generator: torch.Generator | int | None = None,
) -> list[Tensor]:
    r"""Random Gaussian directions, normalized per filter (Li et al. 2018) or per layer.

    Each direction ``d`` is drawn with i.i.d. :math:`\mathcal N(0, 1)` entries and then, for
    every weight tensor :math:`W` of the model (rows ``i`` = output neurons of a Linear layer,
    output channels of a Conv layer, i.e. index 0),

    * ``normalization="filter"``: :math:`d_i \leftarrow d_i\,\lVert W_i\rVert / \lVert d_i\rVert`
      (every row of ``d`` gets exactly the norm of the same row of the weights);
    * ``normalization="layer"``: :math:`d \leftarrow d\,\lVert W\rVert_F / \lVert d\rVert_F`;
    * ``normalization=None``: the raw Gaussian vector.

    **1-D parameters** (biases, BatchNorm/LayerNorm weights and biases) follow ``ignore``:

    * ``ignore="biasbn"`` (default, as Li et al.): their entries of the direction are set to
      zero, so the projection moves only the weight matrices/kernels and a bias of zero stays
      zero. This keeps the plot from being dominated by parameters whose scale has no "filter".
    * ``ignore=None``: each 1-D parameter is normalized as one block,
      :math:`d \leftarrow d\,\lVert b\rVert / \lVert d\rVert` (with either normalization). A
      zero-initialized bias thus also gets a zero direction. (Li et al.'s code instead copies the
      weights into the direction; we keep the random direction and only match its norm.)

    With ``normalization=None`` nothing is rescaled or zeroed and ``ignore`` has no effect.

    Parameters
    ----------
    model : nn.Module
        The model whose parameters define the point and the scales (not modified).
    num : int
        Number of directions, ``>= 1``.
    normalization : {"filter", "layer", None}
        See above.
    ignore : {"biasbn", None}
        Policy for 1-D parameters, see above.
    orthogonalize : bool
        After normalizing, Gram–Schmidt the directions against each other (in the order drawn)
        and rescale each to its norm before orthogonalization. Filter norms then hold only
        approximately (in high dimension random directions are nearly orthogonal anyway, so the
        change is small).
    params : iterable of tensors or names, optional
        Restrict to these parameters (same meaning as ``ParameterLayout.from_module``).
    generator : torch.Generator or int, optional
        Source of randomness, or a seed (its device decides where the numbers are drawn).
        ``None``: a fresh, nondeterministically seeded generator. The global RNG is never used.

    Returns
    -------
    list of Tensor
        ``num`` flat vectors in ``ParameterLayout.from_module(model, params)`` order, on the
        parameters' device and dtype.

    References
    ----------
    H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the Loss Landscape of Neural
    Nets", NeurIPS 2018, §4.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if ignore not in _IGNORE:
        raise ValueError(f"ignore must be one of {_IGNORE}, got {ignore!r}")
    layout = ParameterLayout.from_module(model, params)
    weights = [p.detach() for p in layout.parameters(model)]
    generator = as_generator(generator)
    draw_device = generator.device
    directions = []
    for _ in range(num):
        blocks = []
        for w in weights:
            d = torch.randn(w.shape, generator=generator, device=draw_device, dtype=w.dtype)
            blocks.append(_normalize_parameter(d.to(w.device), w, normalization, ignore))
        directions.append(layout.flatten(blocks))
    if orthogonalize:
        directions = _gram_schmidt(directions)
    return directions


def _gram_schmidt(vectors: Sequence[Tensor]) -> list[Tensor]:
    """Orthogonalize in order, keeping each vector's original norm."""
    out: list[Tensor] = []
    basis: list[Tensor] = []
    for v in vectors:
        norm = v.norm()
        w = v.clone()
        for _ in range(2):  # twice is enough (Kahan–Parlett "twice is enough")
            for q in basis:
                w = w - (q @ w) * q
        w_norm = w.norm()
        if w_norm <= 1e-6 * norm or norm == 0:
            raise ValueError("orthogonalize: the directions are linearly dependent")
        basis.append(w / w_norm)
        out.append(w * (norm / w_norm))
    return out


@dataclass(frozen=True)
class HessianDirections:
    """Unit eigenvectors of the extreme Hessian eigenvalues.

    Attributes
    ----------
    v_max, v_min : Tensor
        Unit-norm flat vectors for ``lambda_max`` (most positive) and ``lambda_min`` (most
        negative, or smallest) eigenvalue.
    lambda_max, lambda_min : float
        The eigenvalues.
    eigenpairs : ExtremeEigenpairs or None
        The engine's result (residuals, convergence flag, cost); ``None`` for directions built
        by hand (then ``converged`` is ``True`` and the cost is zero: nothing was solved).
    """

    v_max: Tensor
    v_min: Tensor
    lambda_max: float
    lambda_min: float
    eigenpairs: ExtremeEigenpairs | None

    @property
    def directions(self) -> list[Tensor]:
        """``[v_max, v_min]``, the order used by :func:`loss_surface`."""
        return [self.v_max, self.v_min]

    @property
    def eigenvalues(self) -> tuple[float, float]:
        """``(lambda_max, lambda_min)``."""
        return (self.lambda_max, self.lambda_min)

    @property
    def converged(self) -> bool:
        """Whether the engine reports both eigenpairs converged."""
        return True if self.eigenpairs is None else bool(self.eigenpairs.converged)

    @property
    def num_matvecs(self) -> int:
        """Hessian-vector products spent."""
        return 0 if self.eigenpairs is None else int(self.eigenpairs.num_matvecs)

    @property
    def seconds(self) -> float:
        """Wall time of the eigensolver."""
        return 0.0 if self.eigenpairs is None else float(self.eigenpairs.seconds)


def hessian_directions(
    op: Any,
    *,
    v0: Tensor | Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    **lanczos_kwargs: Any,
) -> HessianDirections:
    """Eigenvectors of λ_max and λ_min of a Hessian operator, via the engine's Lanczos.

    Parameters
    ----------
    op : HessianOperator or duck-typed operator
        Anything :func:`lightning_curvature.curvature.extreme_eigenpairs` accepts (``dim``,
        ``matvec``, optional ``matmat``).
    v0 : Tensor or sequence of Tensor, optional
        Warm start, e.g. the previous snapshot's ``(v_max, v_min)``.
    generator : torch.Generator, optional
        Randomness for the Lanczos start vector.
    **lanczos_kwargs
        Passed on (``max_iters``, ``tol``, ...). The engine's ``tol`` is relative to
        ``max(|λ_max|, |λ_min|)``: a small negative ``λ_min`` next to a large ``λ_max`` (the usual
        case near a trained point) is only resolved with ``tol`` well below
        ``|λ_min| / λ_max``; check ``eigenpairs.residual_min`` before reading the sign of
        ``lambda_min``.

    Returns
    -------
    HessianDirections

    References
    ----------
    L. Böttcher, G. Wheeler, "Visualizing high-dimensional loss landscapes with Hessian
    directions", J. Stat. Mech. (2024) 023401, §II.
    """
    pairs = extreme_eigenpairs(op, v0=v0, generator=generator, **lanczos_kwargs)
    return HessianDirections(
        v_max=pairs.v_max,
        v_min=pairs.v_min,
        lambda_max=float(pairs.lambda_max),
        lambda_min=float(pairs.lambda_min),
        eigenpairs=pairs,
    )
