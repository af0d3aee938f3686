"""Pairwise permutation-aware comparison of several networks of one architecture.

For every pair (a, b) — ``a`` before ``b`` in the order the networks are given, so a base listed
first is compared with every branch — :func:`compare_networks` reports seed 003's Φ before and
after aligning b's hidden units to a's, and the loss barrier on the linear path between a and
the aligned b (and, for reference, the unaligned b). :func:`comparison_scalars` flattens that
into the scalars the ``split`` command logs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ..checks import ArgumentError, check_bool, check_int
from ..curvature.batches import as_batch_set
from ..curvature.functional import LossFn
from .apply import parameter_dict
from .matching import Alignment, weight_matching
from .metric import PhiResult, phi_distance
from .path import PathLoss, linear_path_loss
from .spec import PermutationSpec, spec_for_module

__all__ = ["NetworkComparison", "PairComparison", "compare_networks", "comparison_scalars"]


@dataclass(frozen=True)
class PairComparison:
    """Network ``b`` against network ``a``, before and after aligning b to a.

    Attributes
    ----------
    a, b : str
        Names of the two networks.
    phi_naive : PhiResult
        Φ(θ_a, θ_b) as the units are stored.
    phi_aligned : PhiResult
        Φ(θ_a, π(θ_b)) after weight matching.
    alignment : Alignment
        The permutations (b's units onto a's).
    path_aligned : PathLoss
        Loss on the segment θ_a → π(θ_b); its ``barrier`` is the aligned barrier.
    path_naive : PathLoss or None
        Loss on the segment θ_a → θ_b (``None`` if not requested).
    """

    a: str
    b: str
    phi_naive: PhiResult
    phi_aligned: PhiResult
    alignment: Alignment
    path_aligned: PathLoss
    path_naive: PathLoss | None


@dataclass(frozen=True)
class NetworkComparison:
    """Every pairwise comparison, in the order ``(0,1), (0,2), …, (1,2), …``."""

    names: tuple[str, ...]
    pairs: tuple[PairComparison, ...]
    seconds: float

    def pair(self, a: str, b: str) -> PairComparison:
        """The comparison of ``b`` against ``a``."""
        for p in self.pairs:
            if (p.a, p.b) == (a, b):
                return p
        raise KeyError(f"no pair ({a!r}, {b!r}); pairs are {[(p.a, p.b) for p in self.pairs]}")


def _check_models(named_models: Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    if not isinstance(named_models, Mapping) or len(named_models) < 2:
        raise ArgumentError(
            f"`named_models` must map at least two names to modules, got {named_models!r}"
        )
    items = list(named_models.items())
    for name, model in items:
        if not isinstance(name, str) or not name or "/" in name:
            raise ArgumentError(
                f"`named_models` keys must be non-empty names without '/', got {name!r}"
            )
        if not isinstance(model, nn.Module):
            raise ArgumentError(f"`named_models[{name!r}]` must be an nn.Module, got {type(model)}")
    ref = [(n, tuple(p.shape)) for n, p in items[0][1].named_parameters()]
    for name, model in items[1:]:
        shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        if shapes != ref:
            raise ArgumentError(
                f"`named_models[{name!r}]` must have the architecture of {items[0][0]!r} "
                "(same parameter names and shapes)"
            )
    return items


def compare_networks(
    named_models: Mapping[str, nn.Module],
    loss_fn: LossFn,
    data: object,
    *,
    spec: PermutationSpec | None = None,
    num_points: int = 25,
    naive_path: bool = True,
    max_sweeps: int = 50,
    eval_mode: bool = True,
) -> NetworkComparison:
    """Φ naive, Φ aligned and the loss barriers for every pair of networks.

    Parameters
    ----------
    named_models : dict of name to nn.Module
        At least two networks of one architecture (e.g. ``{"base": m0, "sgd": m1, "ngd": m2}``).
        None of them is modified.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar mean loss``.
    data : (inputs, targets) or iterable of batches or BatchSet
        Measurement set for the path losses (gathered once).
    spec : PermutationSpec, optional
        Hidden spaces; default :func:`spec_for_module` of the first network.
    num_points : int
        Points on each linear path.
    naive_path : bool
        Also evaluate the path to the unaligned network.
    max_sweeps : int
        Weight-matching sweeps (see :func:`weight_matching`).
    eval_mode : bool
        Evaluate the losses in eval mode.
    """
    items = _check_models(named_models)
    num_points = check_int("num_points", num_points, minimum=3)
    naive_path = check_bool("naive_path", naive_path)
    start = time.perf_counter()
    first = items[0][1]
    spec = spec if spec is not None else spec_for_module(first)
    device = next(first.parameters()).device
    batches = as_batch_set(data, device=device)
    params = {name: parameter_dict(model) for name, model in items}
    pairs = []
    for i, (a, model_a) in enumerate(items):
        for b, _ in items[i + 1 :]:
            pa = params[a]
            pb = {n: t.to(device) for n, t in params[b].items()}
            alignment = weight_matching(pa, pb, spec, max_sweeps=max_sweeps)

            def path(target, model_a=model_a, pa=pa):
                return linear_path_loss(
                    model_a, loss_fn, batches, pa, target,
                    num_points=num_points, eval_mode=eval_mode,
                )

            pairs.append(
                PairComparison(
                    a=a,
                    b=b,
                    phi_naive=phi_distance(pa, pb, spec),
                    phi_aligned=phi_distance(pa, alignment.params, spec),
                    alignment=alignment,
                    path_aligned=path(alignment.params),
                    path_naive=path(pb) if naive_path else None,
                )
            )
    return NetworkComparison(tuple(n for n, _ in items), tuple(pairs), time.perf_counter() - start)


def comparison_scalars(comparison: NetworkComparison, prefix: str = "split") -> dict[str, float]:
    """Scalars to log: ``<prefix>/phi/<a>_<b>`` (Φ aligned, overall), ``<prefix>/phi_naive/<a>_<b>``
    and ``<prefix>/barrier/<a>_<b>`` (aligned barrier) for every pair."""
    if not isinstance(comparison, NetworkComparison):
        raise ArgumentError(f"`comparison` must be a NetworkComparison, got {type(comparison)}")
    out: dict[str, float] = {}
    for p in comparison.pairs:
        key = f"{p.a}_{p.b}"
        out[f"{prefix}/phi/{key}"] = p.phi_aligned.overall
        out[f"{prefix}/phi_naive/{key}"] = p.phi_naive.overall
        out[f"{prefix}/barrier/{key}"] = p.path_aligned.barrier
    return out
