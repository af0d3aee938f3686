"""Coordinate blocks of the flat parameter vector: one block per parameter tensor.

Per-block curvature (``tr H_bb``, ``λ_max(H_bb)``) is reported per *parameter tensor* (each
layer's weight and bias separately, named as in ``model.named_parameters()``), the finest split
the flat layout (:class:`~lightning_curvature.curvature.ParameterLayout`) records; a per-module
figure is the sum of its tensors' traces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .operators import CurvatureOperator

__all__ = ["Block", "block_sums", "parameter_blocks", "resolve_blocks"]

#: ``(name, start, stop)``: the coordinates ``start:stop`` of the flat vector.
Block = tuple[str, int, int]


def parameter_blocks(op: CurvatureOperator) -> tuple[Block, ...]:
    """One block per parameter tensor of ``op.layout`` (empty when the operator has none)."""
    layout = op.layout
    if layout is None:
        return ()
    return tuple(
        (name, off, off + n)
        for name, off, n in zip(layout.names, layout.offsets, layout.numels, strict=True)
    )


def resolve_blocks(op: CurvatureOperator, blocks: Sequence[Block] | None) -> tuple[Block, ...]:
    """``blocks`` checked against ``op.dim``, or :func:`parameter_blocks` when ``None``."""
    if blocks is None:
        return parameter_blocks(op)
    out = []
    for k, item in enumerate(blocks):
        ok = isinstance(item, (tuple, list)) and len(item) == 3 and isinstance(item[0], str)
        ok = ok and all(isinstance(i, int) for i in item[1:]) and 0 <= item[1] < item[2] <= op.dim
        if not ok:
            raise ValueError(
                f"`blocks[{k}]` must be a (name, start, stop) triple with "
                f"0 <= start < stop <= {op.dim}, got {item!r}"
            )
        out.append((item[0], int(item[1]), int(item[2])))
    return tuple(out)


def block_sums(values: Tensor, blocks: Sequence[Block]) -> Tensor:
    """``(len(blocks), k)`` float64 sums of the rows of a ``(dim, k)`` tensor over each block."""
    if not blocks:
        return torch.zeros(0, values.shape[1], dtype=torch.float64)
    v = values.to(torch.float64)
    return torch.stack([v[a:b].sum(dim=0) for _, a, b in blocks]).cpu()
