"""Exact alignment of one network's hidden units to another's by weight matching.

Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023, Sec. 3.2) seeks the
permutations π that maximize the inner product of the two parameterizations,

    max_π  Σ_ℓ ⟨W_ℓ^A, π_ℓ W_ℓ^B π_{ℓ−1}ᵀ⟩,

equivalently minimize ‖θ_A − π(θ_B)‖². With every space but one held fixed, the problem in the
remaining space ℓ is a linear assignment: unit ``i`` of A paired with unit ``j`` of B earns

    C_ij = Σ_producers ⟨A[i, :], B̃[j, :]⟩ + Σ_consumers ⟨A[:, i], B̃[:, j]⟩,

(B̃: B with the other spaces' current permutations applied), solved exactly by
``scipy.optimize.linear_sum_assignment``. Sweeping the spaces until no permutation changes is
coordinate ascent: the objective never decreases, and it stops after finitely many sweeps at a
point no single-space change improves (a local optimum of the joint problem, which is NP-hard).
For a permuted, slightly perturbed copy the first sweep already recovers the permutation,
because each layer's producer term pairs every unit with its own copy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..checks import check_int
from .apply import Permutations, apply_permutations, identity_permutations, unit_rows
from .spec import PermutationSpec, UnitSpace

__all__ = ["Alignment", "matching_objective", "weight_matching"]


@dataclass(frozen=True)
class Alignment:
    """Permutations that align network B to network A.

    Attributes
    ----------
    perms : dict of space name to LongTensor
        ``perms[s][i]`` is B's unit that plays A's unit ``i`` (``new i = old perm[i]``).
    params : dict of parameter name to Tensor
        π(θ_B): B's parameters reordered, the same function as B.
    objective : float
        Σ ⟨θ_A, π(θ_B)⟩ over the covered parameters at the end.
    initial_objective : float
        The same inner product before alignment (identity permutations).
    sweeps : int
        Full passes over the hidden spaces, the last of which changed nothing if ``converged``.
    converged : bool
        Whether a sweep left every permutation unchanged within ``max_sweeps``.
    seconds : float
        Wall time.
    """

    perms: Permutations
    params: dict[str, Tensor]
    objective: float
    initial_objective: float
    sweeps: int
    converged: bool
    seconds: float


def matching_objective(
    params_a: Mapping[str, Tensor], params_b: Mapping[str, Tensor], spec: PermutationSpec
) -> float:
    """Σ ⟨A, B⟩ over the parameters the spec covers (float64)."""
    return float(
        sum(
            (params_a[n].detach().double() * params_b[n].detach().double().to(params_a[n].device))
            .sum()
            for n in spec.parameter_names
        )
    )


def _assignment_cost(
    space: UnitSpace, params_a: Mapping[str, Tensor], params_b: Mapping[str, Tensor]
) -> np.ndarray:
    cost = None
    for axis in space.axes:
        rows_a = unit_rows(params_a[axis.name].detach().double(), axis, space.size)
        rows_b = unit_rows(params_b[axis.name].detach().double(), axis, space.size)
        term = rows_a @ rows_b.to(rows_a.device).T
        cost = term if cost is None else cost + term
    assert cost is not None
    return cost.cpu().numpy()


def _solve_space(
    space: UnitSpace,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    spec: PermutationSpec,
    perms: Permutations,
) -> Tensor:
    others = {k: p for k, p in perms.items() if k != space.name}
    partial = apply_permutations(params_b, spec, others)
    rows, cols = linear_sum_assignment(_assignment_cost(space, params_a, partial), maximize=True)
    # rows come back sorted 0..n-1, so cols[i] is B's unit assigned to A's unit i.
    assert np.array_equal(rows, np.arange(space.size))
    return torch.as_tensor(cols, dtype=torch.int64)


def weight_matching(
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    max_sweeps: int = 50,
) -> Alignment:
    """Align network B's hidden units to network A's (Git Re-Basin weight matching).

    Parameters
    ----------
    params_a, params_b : dict of parameter name to Tensor
        Two parameterizations of the architecture ``spec`` describes (see
        :func:`parameter_dict`). Neither is modified.
    spec : PermutationSpec
        Hidden spaces (e.g. :func:`spec_for_module`).
    max_sweeps : int
        Upper bound on passes over the spaces (each pass solves one assignment per space,
        input side first).

    Returns
    -------
    Alignment
        Permutations, the permuted ``params_b``, and the objective before and after.
    """
    max_sweeps = check_int("max_sweeps", max_sweeps, minimum=1)
    spec.check_params(params_a, "params_a")
    spec.check_params(params_b, "params_b")
    start = time.perf_counter()
    perms = identity_permutations(spec)
    initial = matching_objective(params_a, params_b, spec)
    converged, sweeps = False, 0
    while sweeps < max_sweeps and not converged:
        sweeps += 1
        converged = True
        for space in spec.spaces:
            new = _solve_space(space, params_a, params_b, spec, perms)
            if not torch.equal(new, perms[space.name]):
                perms[space.name] = new
                converged = False
    aligned = apply_permutations(params_b, spec, perms)
    return Alignment(
        perms=perms,
        params=aligned,
        objective=matching_objective(params_a, aligned, spec),
        initial_objective=initial,
        sweeps=sweeps,
        converged=converged,
        seconds=time.perf_counter() - start,
    )
