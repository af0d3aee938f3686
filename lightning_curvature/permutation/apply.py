"""Reorder a network's hidden units: π(θ), which leaves the network's function unchanged.

Parameters are handled as a ``{name: tensor}`` dictionary (the keys of ``named_parameters()``);
a permutation of a hidden space is a 1-D ``LongTensor`` ``perm`` with the convention

    new unit ``i`` = old unit ``perm[i]``

so applying it is an ``index_select`` of every producer's output axis and every consumer's input
axis (in blocks, after a flatten). The inverse is ``argsort(perm)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..checks import ArgumentError
from .spec import ParamAxis, PermutationSpec, UnitSpace

__all__ = [
    "Permutations",
    "apply_permutations",
    "compose_permutations",
    "identity_permutations",
    "invert_permutations",
    "parameter_dict",
    "unit_rows",
]

Permutations = dict[str, Tensor]


def parameter_dict(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of ``model``'s trainable parameters, ``{name: tensor}``."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def unit_rows(tensor: Tensor, axis: ParamAxis, size: int) -> Tensor:
    """``tensor`` as a ``(size, -1)`` matrix whose row ``u`` holds everything unit ``u`` touches.

    The unit axis is moved first; its ``size * block`` entries are grouped ``u*block + k``, so a
    plain reshape gathers each unit's block (and all other axes) into one row.
    """
    return tensor.movedim(axis.axis, 0).reshape(size, -1)


def _permute_axis(tensor: Tensor, axis: ParamAxis, perm: Tensor) -> Tensor:
    moved = tensor.movedim(axis.axis, 0)
    rows = moved.reshape(perm.numel(), -1)[perm.to(tensor.device)]
    return rows.reshape(moved.shape).movedim(0, axis.axis)


def _check_perm(space: UnitSpace, perm: Tensor) -> None:
    if not isinstance(perm, Tensor) or perm.dim() != 1 or perm.numel() != space.size:
        raise ArgumentError(
            f"`perms[{space.name!r}]` must be a 1-D tensor of {space.size} indices, got {perm!r}"
        )
    expected = torch.arange(space.size, device=perm.device)
    is_int = perm.dtype in (torch.int64, torch.int32)
    if not is_int or not torch.equal(perm.sort().values, expected):
        raise ArgumentError(
            f"`perms[{space.name!r}]` must be a permutation of 0..{space.size - 1}, got {perm!r}"
        )


def identity_permutations(spec: PermutationSpec) -> Permutations:
    """``arange(n)`` for every hidden space."""
    return {s.name: torch.arange(s.size) for s in spec.spaces}


def invert_permutations(perms: Mapping[str, Tensor]) -> Permutations:
    """π⁻¹ for every space: ``apply(apply(θ, π), π⁻¹) = θ``."""
    return {k: torch.argsort(p) for k, p in perms.items()}


def compose_permutations(first: Mapping[str, Tensor], then: Mapping[str, Tensor]) -> Permutations:
    """The permutation that applies ``first`` and then ``then`` (both ``new i = old perm[i]``)."""
    return {k: first[k][then[k].to(first[k].device)] for k in first}


def apply_permutations(
    params: Mapping[str, Tensor], spec: PermutationSpec, perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """π(θ): every hidden space reordered by its permutation (missing spaces stay as they are).

    Parameters outside the spec are copied through unchanged. The result is a new dictionary;
    ``params`` is not modified.
    """
    spec.check_params(params)
    unknown = set(perms) - {s.name for s in spec.spaces}
    if unknown:
        raise ArgumentError(
            f"`perms` must name hidden spaces of the spec, got {sorted(unknown)} "
            f"(the spec has {[s.name for s in spec.spaces]})"
        )
    out = dict(params)
    for space in spec.spaces:
        if space.name not in perms:
            continue
        perm = perms[space.name]
        _check_perm(space, perm)
        for axis in space.axes:
            out[axis.name] = _permute_axis(out[axis.name], axis, perm)
    return out
