"""The first layer of a grid evaluated once per direction instead of once per point.

On an affine subspace w = w* + Σ_k c_k b_k the first layer of a network, a Linear or
convolution ``s(x; W, β) = x ∗ W + β`` fed by the data alone, is *linear in its parameters*:

    s(x; W* + Σ_k c_k B_k, β* + Σ_k c_k β_k) = s(x; W*, β*) + Σ_k c_k · s(x; B_k, β_k).

So the K + 1 outputs ``Z_0 = s(x; W*, β*)`` and ``Z_k = s(x; B_k, β_k)`` are computed once per
batch, and at every grid point the first layer costs one K+1-term combination of them (a
memory-bound ``(1, K+1) @ (K+1, N·F)`` product) instead of a GEMM over the input features; only
the rest of the network (the *tail*) runs per point. For the MLP 784-128-10 on 2,048 samples the
first layer is 98% of the forward FLOPs, so a 21×21 grid costs well under one forward pass per
point. The result is the same function evaluated in a different order: it agrees with the direct
forward pass to float rounding (exactly at w*, where the combination is 1·Z_0 + 0·Z_k).

When it pays: per output element the layer costs ``fan_in`` multiply-adds (in_features, or
C_in/groups·∏kernel) and the combination one per term, but the combination is memory-bound (it
streams the stored outputs) while the layer is a compute-bound GEMM. ``evaluate_points``
therefore uses the rewrite by default only when ``fan_in >= MIN_FAN_IN_PER_TERM · terms``,
``terms`` being 1 + the most nonzero coordinates of a point (the loop combines only those: 3 on
a 2-D grid, 2 on the lines of the projection trace). The MLP's first Linear (fan-in 784)
qualifies; LeNet-5's first convolution (fan-in 1·5·5 = 25) does not, and was measured about 10%
*slower* with it (its output, 6×28×28 per sample, is large next to its work).

Where it applies (:func:`find_linear_stem`): an ``nn.Sequential`` (exact type, so ``forward``
is the plain chain), or a module that declares in its own class body ``forward_module = "<name>"``
(its ``forward`` is exactly ``self.<name>(x)``, as :class:`~lightning_curvature.models.MLP` and
:class:`~lightning_curvature.models.ImageClassifier` do) and owns no parameter or buffer
outside that child, followed down to such a Sequential; no hooks anywhere; the Sequential's first
parametrized child is an ``nn.Linear`` or
``nn.Conv1d/2d/3d`` (exact types) reached through parameter-free ``Flatten``/``Unflatten``/
``Identity`` children, whose parameters are tied to no other module, and batches whose inputs
are tensors. Anything else is evaluated by the generic path of
:mod:`~lightning_curvature.landscape.evaluation`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_curvature.curvature.functional import FunctionalLoss

__all__ = ["MIN_FAN_IN_PER_TERM", "LinearStem", "find_linear_stem"]

#: Default rule: the rewrite is used when the first layer's fan-in is at least this many times
#: the number of combined outputs K + 1 (a GEMM's multiply-add is ~this much cheaper than a
#: streamed float in the combination; see the module docstring for the two measured cases).
MIN_FAN_IN_PER_TERM = 32

_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)
_STEM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _has_hooks(module: nn.Module) -> bool:
    hook_dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
    )
    return any(len(getattr(m, d, {})) for m in module.modules() for d in hook_dicts)


def _global_hooks() -> bool:
    from torch.nn.modules import module as mod

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    return any(len(getattr(mod, n, {})) for n in names)


def _is_tied(model: nn.Module, layer: nn.Module) -> bool:
    own = {id(p) for p in layer.parameters()}
    seen = [id(p) for _, p in model.named_parameters(remove_duplicate=False) if id(p) in own]
    return len(seen) != len(own)


@dataclass(frozen=True)
class LinearStem:
    """Where the linear first layer sits in an ``nn.Sequential`` (see the module docstring).

    Attributes
    ----------
    index : int
        Position of the first layer among the Sequential's children.
    path : str
        Dotted path of that ``nn.Sequential`` inside the model (``""``: the model itself).
    """

    index: int
    path: str = ""

    def sequential(self, model: nn.Module) -> nn.Sequential:
        """The ``nn.Sequential`` the stem lives in."""
        seq = model.get_submodule(self.path) if self.path else model
        assert isinstance(seq, nn.Sequential)
        return seq

    def child_prefix(self, j: int) -> str:
        """Parameter-name prefix of the Sequential's ``j``-th child in the model's names."""
        return f"{self.path}.{j}." if self.path else f"{j}."

    @property
    def layer_prefix(self) -> str:
        """Parameter-name prefix of the first layer (``"0."``, ``"model.net.1."``, ...)."""
        return self.child_prefix(self.index)

    def fan_in(self, model: nn.Module) -> int:
        """Multiply-adds per output element of the first layer (in_features, or C_in/g·∏k)."""
        layer = self.sequential(model)[self.index]
        if isinstance(layer, nn.Linear):
            return int(layer.in_features)
        return int(layer.in_channels // layer.groups * math.prod(layer.kernel_size))

    def prefix(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """The parameter-free reshapes before the first layer, applied to the data."""
        for child in list(self.sequential(model).children())[: self.index]:
            inputs = child(inputs)
        return inputs

    def outputs(
        self,
        model: nn.Module,
        functional: FunctionalLoss,
        center: Tensor,
        basis: Tensor,
        inputs: Tensor,
    ) -> Tensor:
        """``(K + 1, *out)``: Z_0 at w* and Z_k = s(x; b_k) for every basis row."""
        layer = self.sequential(model)[self.index]
        x = self.prefix(model, inputs)
        prefix = self.layer_prefix
        names = [n for n, _ in layer.named_parameters()]
        at_center = {**functional.fixed_tensors(), **functional.layout.unflatten(center)}
        rows = [functional_call(layer, {n: at_center[prefix + n] for n in names}, (x,))]
        for b in basis:
            direction = functional.layout.unflatten(b)
            # Parameters outside the layout do not move: their direction component is zero.
            params = {
                n: direction[prefix + n]
                if prefix + n in direction
                else torch.zeros_like(at_center[prefix + n])
                for n in names
            }
            rows.append(functional_call(layer, params, (x,)))
        return torch.stack(rows)

    def tail_outputs(self, model: nn.Module, tensors: dict[str, Tensor], hidden: Tensor) -> Tensor:
        """The children after the first layer, at the parameters/buffers in ``tensors``."""
        for j, child in enumerate(self.sequential(model).children()):
            if j <= self.index:
                continue
            prefix = self.child_prefix(j)
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            hidden = functional_call(child, own, (hidden,)) if own else child(hidden)
        return hidden


def _pass_through_path(model: nn.Module) -> str | None:
    """Dotted path from ``model`` down to an ``nn.Sequential`` through declared pass-throughs.

    A pass-through declares ``forward_module = "<name>"`` in its own class body (a subclass
    that may override ``forward`` does not inherit the declaration) and owns no parameter or
    buffer of its own, so its output is exactly that child's.
    """
    names: list[str] = []
    module = model
    while type(module) is not nn.Sequential:
        name = type(module).__dict__.get("forward_module")
        if not isinstance(name, str) or len(names) > 8:
            return None
        child = dict(module.named_children()).get(name)
        owns = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        )
        if child is None or owns:
            return None
        names.append(name)
        module = child
    return ".".join(names)


def find_linear_stem(model: nn.Module, batches: Sequence[object]) -> LinearStem | None:
    """The :class:`LinearStem` of ``model``, or ``None`` where the rewrite does not apply."""
    path = _pass_through_path(model)
    if path is None or _has_hooks(model) or _global_hooks():
        return None
    if not all(isinstance(b[0], Tensor) for b in batches):  # type: ignore[index]
        return None
    seq = model.get_submodule(path) if path else model
    for i, child in enumerate(seq.children()):
        if type(child) in _RESHAPES:
            continue
        if type(child) not in _STEM_LAYERS or any(True for _ in child.buffers()):
            return None
        if _is_tied(model, child):
            return None
        # Any padding mode is fine (it acts on the input); a first layer outside ``layout``
        # simply has zero direction outputs.
        return LinearStem(i, path)
    return None
