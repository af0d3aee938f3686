"""Seed 003's normalized distance between two parameterizations, per layer and overall.

    Φ(W, W′) = Σ_ij (W_ij − W′_ij)² / Σ_ij (W_ij + W′_ij)²          (Glukhov, Eq. 35)

Φ = 0 for identical tensors. For independent zero-mean tensors the cross term Σ W·W′ averages
to zero, so numerator and denominator agree and Φ ≈ 1 (within about 2/√N for N entries, since
Φ ≈ 1 − 2ΣW·W′/Σ(W² + W′²)). Φ is 1 for W′ = 0 and grows without bound as W′ → −W.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from ..checks import ArgumentError
from .spec import PermutationSpec

__all__ = ["PhiResult", "phi", "phi_distance"]


def phi(a: Tensor, b: Tensor) -> float:
    """Φ(a, b) = Σ(a − b)² / Σ(a + b)² of two tensors of the same shape (float64 sums)."""
    if a.shape != b.shape:
        raise ArgumentError(
            f"`b` must have the shape of `a` {tuple(a.shape)}, got {tuple(b.shape)}"
        )
    a64, b64 = a.detach().double(), b.detach().to(a.device).double()
    den = float(((a64 + b64) ** 2).sum())
    if den == 0.0:
        raise ArgumentError("`a + b` must not vanish: Φ is undefined for b = −a")
    return float(((a64 - b64) ** 2).sum()) / den


@dataclass(frozen=True)
class PhiResult:
    """Φ of two parameterizations.

    Attributes
    ----------
    overall : float
        Φ over every covered parameter at once (sums of all layers' numerators and denominators).
    per_layer : tuple of (layer, Φ)
        Φ of each layer (its weight and bias together), in chain order.
    per_parameter : tuple of (parameter, Φ)
        Φ of each parameter tensor.
    """

    overall: float
    per_layer: tuple[tuple[str, float], ...]
    per_parameter: tuple[tuple[str, float], ...]

    def layer(self, name: str) -> float:
        """Φ of layer ``name``."""
        return dict(self.per_layer)[name]


def _sums(a: Tensor, b: Tensor) -> tuple[float, float]:
    a64, b64 = a.detach().double(), b.detach().to(a.device).double()
    return float(((a64 - b64) ** 2).sum()), float(((a64 + b64) ** 2).sum())


def _ratio(num: float, den: float, what: str) -> float:
    if den == 0.0:
        raise ArgumentError(f"`{what}` must not be the negative of the other: Φ is undefined")
    return num / den


def phi_distance(
    params_a: Mapping[str, Tensor], params_b: Mapping[str, Tensor], spec: PermutationSpec
) -> PhiResult:
    """Φ between two parameter dictionaries of the same architecture, per layer and overall.

    No alignment is done here: pass ``params_b`` through :func:`weight_matching` (or
    :func:`canonicalize` both) first for the permutation-aware value.
    """
    spec.check_params(params_a, "params_a")
    spec.check_params(params_b, "params_b")
    sums = {n: _sums(params_a[n], params_b[n]) for n in spec.parameter_names}
    per_parameter = tuple((n, _ratio(*sums[n], n)) for n in spec.parameter_names)
    per_layer = []
    for layer, names in spec.layers:
        num = sum(sums[n][0] for n in names)
        den = sum(sums[n][1] for n in names)
        per_layer.append((layer, _ratio(num, den, layer)))
    num = sum(s[0] for s in sums.values())
    den = sum(s[1] for s in sums.values())
    return PhiResult(_ratio(num, den, "params_b"), tuple(per_layer), per_parameter)

