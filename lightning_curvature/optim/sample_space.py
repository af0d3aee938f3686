"""The pseudo-sample gradient matrix ``G`` (N×d) of one NGD step, used without materializing it.

NGD's exact solve (:mod:`.ngd`) needs three things from ``G``, never ``G`` itself:

* the Gram matrix ``K = G Gᵀ`` (N×N), assembled here as its **lower block triangle** (B×B blocks,
  ``N = R·B`` with ``R`` pseudo-samples per input),
* products ``Gᵀ C`` for coefficient columns ``C`` (N×J), each a weight-gradient-sized product,
* products ``G r`` for a parameter-space vector ``r`` (the Woodbury remainder only).

``Linear``/``Conv2d`` layers contribute through their inputs and output-gradients
(:class:`.factors.LayerFactors`); every other parameter through explicit per-sample gradients from
``torch.func`` (:mod:`.per_sample`). Rows are ordered ``n = r·B + i`` (pseudo-sample ``r`` of
input ``i``), columns in the flat :class:`~lightning_curvature.curvature.params.ParameterLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..curvature.params import ParameterLayout
from .factors import LayerFactors, add_lower_block_gram

__all__ = ["SampleGradients", "lower_block_quadratic_form"]


@dataclass
class SampleGradients:
    """``G`` as layer factors plus explicit fallback rows.

    Attributes
    ----------
    layout : ParameterLayout
        Layout of all optimized parameters (the columns of ``G``).
    reps, batch : int
        ``R`` pseudo-samples per input (1 for the empirical Fisher, C − 1 for the true one) and
        the batch size ``B``; ``N = R·B``.
    factors : list of (LayerFactors, slice, slice or None)
        One entry per factorable layer: its factors and the flat slices of its weight and bias.
    fallback : Tensor or None
        ``(N, k)`` explicit per-sample gradients of the remaining parameters, whose flat slices
        are ``fallback_slices`` (in that order).
    fallback_slices : list of slice
    dtype, device
        Of the optimized parameters; ``Gᵀ C`` is returned in this dtype.
    """

    layout: ParameterLayout
    reps: int
    batch: int
    factors: list[tuple[LayerFactors, slice, slice | None]]
    fallback: Tensor | None
    fallback_slices: list[slice]
    dtype: torch.dtype
    device: torch.device

    @property
    def num_pseudo(self) -> int:
        """``N = R·B``, the number of rows of ``G``."""
        return self.reps * self.batch

    def gram_lower(self) -> Tensor:
        """``K = G Gᵀ`` on its lower block triangle (B×B blocks), in the parameters' dtype.

        Blocks above the block diagonal are zero (never computed): the Cholesky factorization
        reads only the lower triangle, and for ``R`` pseudo-samples per input this computes
        ``R(R+1)/2`` of the ``R²`` blocks. Cost: ``N²/2 · Σ_layers (out + in/R)`` multiply-adds for
        ``Linear`` layers (the input Gram is B×B and shared by the R pseudo-samples).
        """
        n = self.num_pseudo
        gram = torch.zeros(n, n, dtype=self.dtype, device=self.device)
        for f, _, _ in self.factors:
            f.add_gram_lower(gram)
        if self.fallback is not None:
            add_lower_block_gram(gram, self.fallback.view(self.reps, self.batch, -1))
        return gram

    def transpose_times(self, columns: Tensor) -> Tensor:
        """``Gᵀ C`` for ``C`` of shape ``(N, J)``: ``(J, d)`` in the parameters' dtype."""
        j = columns.shape[1]
        pieces: dict[int, Tensor] = {}  # slice start → (J, width), assembled in layout order
        for f, ws, bs in self.factors:
            w, b = f.combine(columns)
            pieces[ws.start] = w.reshape(j, -1).to(self.dtype)
            if bs is not None:
                pieces[bs.start] = b.to(self.dtype)
        if self.fallback is not None:
            prod = (self.fallback.T @ columns.to(self.fallback.dtype)).T.to(self.dtype)
            start = 0
            for sl in self.fallback_slices:
                width = sl.stop - sl.start
                pieces[sl.start] = prod[:, start : start + width]
                start += width
        for sl in self.layout.slices().values():
            if sl.start not in pieces:  # parameter never reached by the loss: zero gradient
                pieces[sl.start] = torch.zeros(
                    j, sl.stop - sl.start, dtype=self.dtype, device=self.device
                )
        return torch.cat([pieces[k] for k in sorted(pieces)], dim=1)

    def transpose_times_parts(self, column: Tensor) -> list[Tensor]:
        """``Gᵀc`` for one coefficient column ``c`` (N,), as one tensor per parameter.

        The same numbers as ``transpose_times(c[:, None])[0]``, shaped like the parameters and in
        layout order, without concatenating them into a flat vector (the step updates the
        parameters tensor by tensor, so the flat copy and its split are two wasted passes over
        ``d`` numbers).
        """
        pieces: dict[int, Tensor] = {}
        for f, ws, bs in self.factors:
            w, b = f.combine(column[:, None])
            pieces[ws.start] = w[0].to(self.dtype)
            if bs is not None:
                pieces[bs.start] = b[0].to(self.dtype)
        if self.fallback is not None:
            prod = (self.fallback.T @ column.to(self.fallback.dtype)).to(self.dtype)
            start = 0
            for sl in self.fallback_slices:
                width = sl.stop - sl.start
                pieces[sl.start] = prod[start : start + width]
                start += width
        out = []
        for sl, shape in zip(self.layout.slices().values(), self.layout.shapes, strict=True):
            piece = pieces.get(sl.start)
            if piece is None:  # parameter never reached by the loss: zero gradient
                piece = torch.zeros(shape, dtype=self.dtype, device=self.device)
            out.append(piece.reshape(shape))
        return out

    def times(self, vector: Tensor) -> Tensor:
        """``G r`` for a flat parameter-space vector ``r`` (d,): ``(N,)`` in float64."""
        out = torch.zeros(self.num_pseudo, dtype=torch.float64, device=self.device)
        for f, ws, bs in self.factors:
            w_shape = (f.d.shape[-1], f.a.shape[-1])
            out += f.apply(
                vector[ws].reshape(w_shape), vector[bs] if bs is not None else None
            ).double()
        if self.fallback is not None:
            r_fb = torch.cat([vector[sl] for sl in self.fallback_slices])
            out += (self.fallback @ r_fb.to(self.fallback.dtype)).double()
        return out


def lower_block_quadratic_form(gram_lower: Tensor, v: Tensor, block: int) -> float:
    """``vᵀ K v`` from the lower block triangle ``L`` of a symmetric ``K`` (blocks of size block).

    ``K = L + Lᵀ − blockdiag(L)``, so ``vᵀKv = 2·vᵀLv − Σ_i v_iᵀ L_ii v_i``. With ``v`` the span
    coefficients this is ``‖Gᵀv‖²``, free of any parameter-space product.
    """
    v = v.to(gram_lower.dtype)
    total = 2 * float(v @ (gram_lower @ v))
    for start in range(0, v.shape[0], block):
        sl = slice(start, start + block)
        total -= float(v[sl] @ (gram_lower[sl, sl] @ v[sl]))
    return total
