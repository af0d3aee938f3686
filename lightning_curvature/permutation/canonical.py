"""Seed 003's reordering heuristics: a canonical order of each layer's units.

The purpose (Glukhov, Sec. 6.1): order each layer's units while preserving their connectivity,
so that two networks that differ by a permutation (plus a small disturbance) end up with the same
or very close internal structure, comparable with Φ without solving an assignment problem. The
layers are treated input side first: once layer ``k−1``'s units are in canonical order, the
incoming weights of layer ``k``'s units are expressed in a canonical basis and can be sorted.

Two heuristics, each applied to the matrix whose row ``u`` is unit ``u``'s incoming weights
(its weight row, flattened over input channels and kernel, then its bias):

* ``"lexicographic"`` (Sorensen 2020): sort the rows lexicographically, comparing the first
  element of each row, then the second, and so on.
* ``"maximin"`` (Glukhov, Eq. 36): find the input ``i*`` whose weights spread most across
  units, ``i* = argmax_i (max_u W_ui − min_u W_ui)``, and sort the units by ``W_{u i*}``.

Both are O(n log n) per layer and exact for an unperturbed permuted copy (ties aside); under a
perturbation they fail when two units' sort keys are closer than the perturbation, which the
weight-matching alignment (:mod:`.matching`) does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..checks import check_choice
from .apply import Permutations, apply_permutations, unit_rows
from .spec import PermutationSpec, UnitSpace

__all__ = ["CANONICAL_METHODS", "CanonicalForm", "canonical_order", "canonicalize"]

CANONICAL_METHODS = ("lexicographic", "maximin")


@dataclass(frozen=True)
class CanonicalForm:
    """A network with every hidden layer's units in canonical order.

    Attributes
    ----------
    params : dict of parameter name to Tensor
        The reordered parameters (the same function as the input).
    perms : dict of space name to LongTensor
        The applied permutations (``new i = old perm[i]``), relative to the input.
    method : str
        ``"lexicographic"`` or ``"maximin"``.
    """

    params: dict[str, Tensor]
    perms: Permutations
    method: str


def _incoming(space: UnitSpace, params: Mapping[str, Tensor]) -> np.ndarray:
    rows = [unit_rows(params[a.name].detach().double(), a, space.size) for a in space.producers]
    return torch.cat(rows, dim=1).cpu().numpy()


def canonical_order(features: np.ndarray, method: str) -> np.ndarray:
    """Indices that put the units (rows of ``features``) in canonical order.

    Parameters
    ----------
    features : array (units, inputs)
        Row ``u``: unit ``u``'s incoming weights.
    method : {"lexicographic", "maximin"}
    """
    method = check_choice("method", method, CANONICAL_METHODS)
    if method == "lexicographic":
        # np.lexsort's primary key is the last one given: pass the columns last-to-first.
        return np.lexsort(features.T[::-1])
    spread = features.max(axis=0) - features.min(axis=0)
    driver = int(np.argmax(spread))
    return np.argsort(features[:, driver], kind="stable")


def canonicalize(
    params: Mapping[str, Tensor], spec: PermutationSpec, method: str = "lexicographic"
) -> CanonicalForm:
    """Reorder every hidden layer's units by ``method``, input side first.

    ``params`` is not modified; the network's outputs are unchanged (up to float summation order).
    """
    method = check_choice("method", method, CANONICAL_METHODS)
    spec.check_params(params)
    current = dict(params)
    perms: Permutations = {}
    for space in spec.spaces:
        # Each space is reordered once, after the spaces feeding it are already canonical.
        order = torch.as_tensor(canonical_order(_incoming(space, current), method).copy())
        perms[space.name] = order.to(torch.int64)
        current = apply_permutations(current, spec, {space.name: perms[space.name]})
    return CanonicalForm(current, perms, method)
