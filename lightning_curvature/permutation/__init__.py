"""Permutation-aware comparison of networks (seed 003), without Lightning.

* :class:`PermutationSpec` — which parameter axes index each hidden layer's units;
  :func:`spec_for_module`, :func:`mlp_spec`, :func:`lenet5_spec`, :func:`chain_spec`.
* :func:`apply_permutations` — π(θ), the same function with reordered units.
* :func:`canonicalize` — seed 003's lexicographic / maximin reordering to a canonical form.
* :func:`weight_matching` — exact layer-wise alignment of one network to another (LAP).
* :func:`phi_distance` — Φ(W, W′) = Σ(W − W′)² / Σ(W + W′)², per layer and overall.
* :func:`linear_path_loss` — the loss on the segment between two networks and its barrier.
* :func:`compare_networks`, :func:`comparison_scalars` — all of it for every pair of networks.
"""

from .apply import (
    Permutations,
    apply_permutations,
    compose_permutations,
    identity_permutations,
    invert_permutations,
    parameter_dict,
)
from .canonical import CANONICAL_METHODS, CanonicalForm, canonicalize
from .compare import NetworkComparison, PairComparison, compare_networks, comparison_scalars
from .matching import Alignment, matching_objective, weight_matching
from .metric import PhiResult, phi, phi_distance
from .path import PathLoss, linear_path_loss
from .spec import (
    ChainLayer,
    ParamAxis,
    PermutationSpec,
    UnitSpace,
    chain_spec,
    infer_chain,
    lenet5_spec,
    mlp_spec,
    spec_for_module,
)

__all__ = [
    "CANONICAL_METHODS",
    "Alignment",
    "CanonicalForm",
    "ChainLayer",
    "NetworkComparison",
    "PairComparison",
    "ParamAxis",
    "PathLoss",
    "PermutationSpec",
    "Permutations",
    "PhiResult",
    "UnitSpace",
    "apply_permutations",
    "canonicalize",
    "chain_spec",
    "compare_networks",
    "comparison_scalars",
    "compose_permutations",
    "identity_permutations",
    "infer_chain",
    "invert_permutations",
    "lenet5_spec",
    "linear_path_loss",
    "matching_objective",
    "mlp_spec",
    "parameter_dict",
    "phi",
    "phi_distance",
    "spec_for_module",
    "weight_matching",
]
