"""Loss surfaces: L(w* + a·d₁ + b·d₂) on a centred grid (or L(w* + a·d) on a line)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from lightning_curvature.checks import check_int
from lightning_curvature.curvature.functional import LossFn
from lightning_curvature.curvature.model_operator import ReduceFn

from .directions import HessianDirections
from .evaluation import evaluate_with_center

__all__ = ["LossSurface", "loss_surface"]


@dataclass
class LossSurface:
    """The loss on a centred 1-D or 2-D grid of a projection.

    Attributes
    ----------
    coords : tuple of ndarray
        One array of step sizes per direction (``a`` and ``b``), each of length ``steps``.
    losses : ndarray
        ``(steps,)`` or ``(steps, steps)``; ``losses[i, j] = L(w* + coords[0][i] d₁ +
        coords[1][j] d₂)`` (first index: first direction).
    center_loss : float
        ``L(w*)``.
    direction_norms : tuple of float
        Euclidean norm of each direction (a step ``a`` moves ``|a|·‖d‖`` in parameter space).
    labels : tuple of str
        Axis names (``"v_max"``, ``"v_min"`` for Hessian directions, ``"d1"``, ``"d2"`` else).
    eigenvalues : tuple of float or None
        Hessian eigenvalues of the directions when they are eigenvectors; the quadratic model is
        then ``L ≈ center_loss + ½ Σ_k λ_k ‖d_k‖² a_k²``.
    num_forward : int
        Forward passes run by this process (grid points x batches).
    chunk_size : int
        Grid points per vectorized call (1 = evaluated one by one).
    vectorized : bool
        Whether ``vmap`` over grid points was used.
    seconds : float
        Wall time.
    metadata : dict
        Free-form extras (e.g. epoch), saved with :meth:`save_npz` when JSON-like scalars.
    """

    coords: tuple[np.ndarray, ...]
    losses: np.ndarray
    center_loss: float
    direction_norms: tuple[float, ...]
    labels: tuple[str, ...]
    eigenvalues: tuple[float, ...] | None = None
    num_forward: int = 0
    chunk_size: int = 1
    vectorized: bool = False
    seconds: float = 0.0
    metadata: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        """1 for a line, 2 for a plane."""
        return len(self.coords)

    def grid_minimum(self) -> tuple[tuple[float, ...], float]:
        """Coordinates and loss of the smallest grid value."""
        index = np.unravel_index(int(np.nanargmin(self.losses)), self.losses.shape)
        return tuple(float(c[i]) for c, i in zip(self.coords, index, strict=True)), float(
            self.losses[index]
        )

    def save_npz(self, path: str | os.PathLike) -> None:
        """Write everything needed to re-plot (``numpy.savez``); read back with :meth:`load_npz`."""
        extras = {
            f"meta_{k}": np.asarray(v)
            for k, v in self.metadata.items()
            if isinstance(v, (int, float, str, bool, np.number))
        }
        np.savez(
            path,
            losses=self.losses,
            center_loss=np.float64(self.center_loss),
            direction_norms=np.asarray(self.direction_norms, dtype=np.float64),
            labels=np.asarray(self.labels),
            eigenvalues=np.asarray(
                self.eigenvalues if self.eigenvalues is not None else [], dtype=np.float64
            ),
            num_forward=np.int64(self.num_forward),
            chunk_size=np.int64(self.chunk_size),
            vectorized=np.bool_(self.vectorized),
            seconds=np.float64(self.seconds),
            **{f"coords_{k}": c for k, c in enumerate(self.coords)},
            **extras,
        )

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> LossSurface:
        """Inverse of :meth:`save_npz`."""
        with np.load(path) as f:
            ndim = sum(1 for k in f.files if k.startswith("coords_"))
            eig = f["eigenvalues"]
            return cls(
                coords=tuple(f[f"coords_{k}"] for k in range(ndim)),
                losses=f["losses"],
                center_loss=float(f["center_loss"]),
                direction_norms=tuple(float(x) for x in f["direction_norms"]),
                labels=tuple(str(x) for x in f["labels"]),
                eigenvalues=tuple(float(x) for x in eig) if eig.size else None,
                num_forward=int(f["num_forward"]),
                chunk_size=int(f["chunk_size"]),
                vectorized=bool(f["vectorized"]),
                seconds=float(f["seconds"]),
                metadata={k[5:]: f[k].item() for k in f.files if k.startswith("meta_")},
            )


def _centred_coords(extent: float, steps: int) -> np.ndarray:
    coords = np.linspace(-extent, extent, steps)
    if steps % 2 == 1:
        coords[steps // 2] = 0.0  # exact, so the centre of the grid is w* itself
    return coords


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    directions: Sequence[Tensor] | HessianDirections,
    *,
    extent: float | Sequence[float] = 1.0,
    steps: int = 21,
    eval_mode: bool | None = True,
    reduce_fn: ReduceFn | None = None,
    params: object = None,
    labels: Sequence[str] | None = None,
    eigenvalues: Sequence[float] | None = None,
    chunk_size: int | None = None,
    memory_budget: int = 1 << 30,
    vectorize: bool | None = None,
    linear_stem: bool | None = None,
) -> LossSurface:
    r"""The loss on a centred grid :math:`L(w^* + a\,d_1 + b\,d_2)`, :math:`a, b \in [-e, e]`.

    With one direction the result is the 1-D slice :math:`L(w^* + a\,d_1)`. The loss is the
    sample-weighted mean over ``data`` (independent of the batch split), evaluated with
    ``torch.func.functional_call`` under ``torch.no_grad``: the module's parameters, buffers,
    ``.grad`` and mode are never changed. Grid points are evaluated in chunks (vmap over stacked
    parameters on accelerators, a loop on the CPU) and, where the model allows it, with its
    Linear/conv first layer computed once per direction instead of once per point (see
    :mod:`lightning_curvature.landscape.evaluation` and :mod:`~lightning_curvature.landscape.stem`).

    Parameters
    ----------
    model : nn.Module
        The network at :math:`w^*` (its current parameters).
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar mean loss``.
    data : (inputs, targets), iterable of batches, DataLoader or BatchSet
        The measurement set (gathered once).
    directions : sequence of 1 or 2 Tensors, or HessianDirections
        Flat vectors in ``ParameterLayout`` order, e.g. from :func:`random_directions`. A
        :class:`HessianDirections` gives ``(v_max, v_min)`` with their eigenvalues and labels.
    extent : float or pair of floats
        Half-width of the grid along each direction (in multiples of the direction).
    steps : int
        Grid points per axis, ``>= 2`` (odd puts :math:`w^*` on the grid).
    eval_mode : bool or None
        Evaluate in eval mode (default; BatchNorm running stats, no dropout), train mode
        (``False``) or as is (``None``). The model's mode is restored.
    reduce_fn : callable, optional
        DDP sum across ranks; each rank passes its shard and all get the global surface.
    params : optional
        Parameter subset the directions live in (as ``ParameterLayout.from_module``).
    labels, eigenvalues : optional
        Axis names and, for eigenvector directions, their eigenvalues (figure titles, slices).
    chunk_size, memory_budget, vectorize, linear_stem :
        As in :func:`~lightning_curvature.landscape.evaluate_points`: points per vmap call
        (default: as many as fit in ``memory_budget`` bytes); vmap on/off (``None``: vmap on
        accelerators, the loop on the CPU, a fixed rule); the first-layer rewrite on/off
        (``None``: wherever the model allows it).

    Returns
    -------
    LossSurface

    References
    ----------
    H. Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018; L. Böttcher and
    G. Wheeler, "Visualizing high-dimensional loss landscapes with Hessian directions", 2024.
    """
    if isinstance(directions, HessianDirections):
        if labels is None:
            labels = ("v_max", "v_min")
        if eigenvalues is None:
            eigenvalues = directions.eigenvalues
        dirs = directions.directions
    else:
        dirs = list(directions)
    if len(dirs) not in (1, 2):
        raise ValueError(f"directions: give 1 or 2 direction vectors, got {len(dirs)}")
    check_int("steps", steps, minimum=2)
    extents = [float(extent)] * len(dirs) if np.isscalar(extent) else [float(e) for e in extent]
    if len(extents) != len(dirs) or any(not (e > 0 and np.isfinite(e)) for e in extents):
        raise ValueError(
            f"extent must be a positive finite number or one per direction, got {extent!r}"
        )
    labels = tuple(labels) if labels is not None else tuple(f"d{k + 1}" for k in range(len(dirs)))
    if len(labels) != len(dirs):
        raise ValueError(f"labels: need {len(dirs)} labels, got {len(labels)}")
    if eigenvalues is not None:
        eigenvalues = tuple(float(x) for x in eigenvalues)
        if len(eigenvalues) != len(dirs):
            raise ValueError(f"eigenvalues: need {len(dirs)} values, got {len(eigenvalues)}")

    coords = tuple(_centred_coords(e, steps) for e in extents)
    mesh = np.meshgrid(*coords, indexing="ij")
    coefficients = np.stack([m.reshape(-1) for m in mesh], axis=1)
    on_grid = steps % 2 == 1
    basis = torch.stack([d.detach().reshape(-1) for d in dirs])
    result, center = evaluate_with_center(
        model,
        loss_fn,
        data,
        basis,
        torch.from_numpy(coefficients),
        # Odd steps put w* on the grid (exact zero coordinates): its own row is the centre.
        center_index=(steps ** len(dirs)) // 2 if on_grid else None,
        params=params,
        eval_mode=eval_mode,
        reduce_fn=reduce_fn,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        vectorize=vectorize,
        linear_stem=linear_stem,
    )
    grid_values = result.losses.numpy().reshape((steps,) * len(dirs))
    return LossSurface(
        coords=coords,
        losses=grid_values,
        center_loss=float(center),
        direction_norms=tuple(float(torch.linalg.vector_norm(d.double())) for d in basis),
        labels=labels,
        eigenvalues=eigenvalues,
        num_forward=result.num_forward,
        chunk_size=result.chunk_size,
        vectorized=result.vectorized,
        seconds=result.seconds,
    )
