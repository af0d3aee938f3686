"""Which parameter axes index the hidden units: a description of a network's permutation symmetry.

A hidden layer of ``n`` units (neurons, or conv channels) can be reordered by any permutation π
without changing the network's function, provided every tensor that *produces* the units (the
layer's weight rows and bias) and every tensor that *consumes* them (the next layer's weight
columns) is reordered consistently (seed 003, Eq. 29: π(θ) = (W₁π₁, π₁⁻¹W₂π₂, …)).

A :class:`PermutationSpec` records, for every hidden space, those tensors and the axis along which
they index the units. It is built from a description of the layer chain (:class:`ChainLayer`),
so nothing here is tied to the package's own model classes; :func:`mlp_spec` and
:func:`lenet5_spec` are the adapters for :class:`~lightning_curvature.models.MLP` and
:class:`~lightning_curvature.models.LeNet5`, and :func:`infer_chain` reads the chain off any module
built as a plain sequence of ``Linear``/``Conv`` layers.

The chain assumption: between consecutive layers sit only unit-wise operations (elementwise
activations, per-channel pooling, a flatten), so permuting a layer's output units permutes the
next layer's inputs in the same way (in blocks of ``in_block`` inputs after a flatten of a
``C x H x W`` feature map: input ``c*H*W + s`` belongs to channel ``c``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import ArgumentError, check_int

__all__ = [
    "ChainLayer",
    "ParamAxis",
    "PermutationSpec",
    "UnitSpace",
    "chain_spec",
    "infer_chain",
    "lenet5_spec",
    "mlp_spec",
    "spec_for_module",
]

_CHAIN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ParamAxis:
    """One axis of one parameter tensor that indexes the units of a hidden space.

    Attributes
    ----------
    name : str
        Parameter name (as in ``named_parameters()``).
    axis : int
        The axis (0: a producer's output axis; 1: a consumer's input axis).
    block : int
        Consecutive entries along ``axis`` per unit (1, or ``H*W`` after flattening a feature map).
    """

    name: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class UnitSpace:
    """A hidden layer's units: the tensors that produce them and those that consume them."""

    name: str
    size: int
    producers: tuple[ParamAxis, ...]
    consumers: tuple[ParamAxis, ...]

    @property
    def axes(self) -> tuple[ParamAxis, ...]:
        """Every parameter axis that a permutation of this space reorders."""
        return self.producers + self.consumers


@dataclass(frozen=True)
class PermutationSpec:
    """The hidden spaces of a network, in forward order, and the layers Φ is reported for.

    Attributes
    ----------
    spaces : tuple of UnitSpace
        Permutable hidden spaces, input side first (the input and output spaces are not
        permutable and do not appear).
    layers : tuple of (layer name, parameter names)
        Groups of parameters for per-layer summaries (a module's weight and bias).
    shapes : mapping of parameter name to shape
        Every parameter the spec covers, with its shape (checked against inputs).
    """

    spaces: tuple[UnitSpace, ...]
    layers: tuple[tuple[str, tuple[str, ...]], ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Every parameter the spec covers, in chain order."""
        return tuple(n for n, _ in self.shapes)

    def space(self, name: str) -> UnitSpace:
        """The hidden space called ``name``."""
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(f"no hidden space {name!r}; the spec has {[s.name for s in self.spaces]}")

    def check_params(self, params: Mapping[str, torch.Tensor], what: str = "params") -> None:
        """Raise :class:`ArgumentError` unless ``params`` holds each covered tensor in shape."""
        for name, shape in self.shapes:
            if name not in params:
                raise ArgumentError(
                    f"`{what}` must hold every parameter of the spec, got no {name!r} "
                    f"(it has {sorted(params)})"
                )
            got = tuple(params[name].shape)
            if got != shape:
                raise ArgumentError(
                    f"`{what}[{name!r}]` must have shape {shape}, got {got}"
                )


@dataclass(frozen=True)
class ChainLayer:
    """One ``Linear``/``Conv`` layer of a chain, named by its module path.

    Attributes
    ----------
    prefix : str
        Module path; its parameters are ``prefix.weight`` and (optionally) ``prefix.bias``.
    in_block : int
        Inputs of this layer per output unit of the previous layer (``H*W`` for the first
        ``Linear`` after flattening a ``C x H x W`` map, otherwise 1).
    """

    prefix: str
    in_block: int = 1


def _param_name(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def chain_spec(
    layers: Sequence[ChainLayer], shapes: Mapping[str, Sequence[int] | torch.Size]
) -> PermutationSpec:
    """The permutation spec of a chain of layers.

    Hidden space ``k`` is the output of layer ``k`` (``k < len(layers) - 1``): produced by
    ``weight`` axis 0 and ``bias``, consumed by layer ``k+1``'s ``weight`` axis 1 in blocks of
    ``in_block``.

    Parameters
    ----------
    layers : sequence of ChainLayer
        At least two layers, input side first.
    shapes : mapping of parameter name to shape
        E.g. ``{n: p.shape for n, p in model.named_parameters()}``.
    """
    if len(layers) < 2:
        raise ArgumentError(
            f"`layers` must be a chain of at least two layers (one hidden space), got {len(layers)}"
        )
    named = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
    weights, biases = [], []
    for k, layer in enumerate(layers):
        check_int(f"layers[{k}].in_block", layer.in_block, minimum=1)
        w = _param_name(layer.prefix, "weight")
        if w not in named or len(named[w]) < 2:
            raise ArgumentError(
                f"`layers[{k}]` must name a layer with a weight of rank >= 2, got {layer.prefix!r} "
                f"(no such weight among {sorted(named)})"
            )
        b = _param_name(layer.prefix, "bias")
        weights.append(w)
        biases.append(b if b in named else None)
    spaces, covered = [], []
    for k, (layer, nxt) in enumerate(zip(layers[:-1], layers[1:], strict=True)):
        size = named[weights[k]][0]
        needed = size * nxt.in_block
        if named[weights[k + 1]][1] != needed:
            raise ArgumentError(
                f"`layers[{k + 1}]` ({nxt.prefix!r}) must take {size} units x in_block "
                f"{nxt.in_block} = {needed} inputs, got {named[weights[k + 1]][1]}"
            )
        producers = [ParamAxis(weights[k], 0)]
        if biases[k] is not None:
            producers.append(ParamAxis(biases[k], 0))
        consumers = (ParamAxis(weights[k + 1], 1, nxt.in_block),)
        spaces.append(UnitSpace(layer.prefix, size, tuple(producers), consumers))
    groups = []
    for layer, w, b in zip(layers, weights, biases, strict=True):
        names = (w,) if b is None else (w, b)
        groups.append((layer.prefix, names))
        covered += [(n, named[n]) for n in names]
    return PermutationSpec(tuple(spaces), tuple(groups), tuple(covered))


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters()}


def infer_chain(model: nn.Module) -> list[ChainLayer]:
    """The ``Linear``/``Conv`` layers of ``model`` in registration order, as a chain.

    Valid when the model applies them in that order with only unit-wise operations in between
    (activations, per-channel pooling, flatten), as :class:`MLP` and :class:`LeNet5` do. Modules
    with parameters of another kind (BatchNorm, embeddings, ...) are refused, since their axes
    would also need permuting; describe such models with :func:`chain_spec` directly.
    ``in_block`` is inferred as ``in_features / previous out units``.
    """
    chain: list[ChainLayer] = []
    prev_out: int | None = None
    for prefix, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, _CHAIN_TYPES):
            width_in = module.weight.shape[1]
            block = 1
            if prev_out is not None:
                if width_in % prev_out:
                    raise ArgumentError(
                        f"`model` must be a chain; layer {prefix!r} takes {width_in} inputs, "
                        f"not a multiple of the previous layer's {prev_out} units"
                    )
                block = width_in // prev_out
            chain.append(ChainLayer(prefix, block))
            prev_out = module.weight.shape[0]
        elif own:
            raise ArgumentError(
                f"`model` must hold only Linear/Conv parameters for infer_chain, got "
                f"{type(module).__name__} at {prefix!r}; describe it with chain_spec"
            )
    return chain


def mlp_spec(model: nn.Module) -> PermutationSpec:
    """Spec of :class:`~lightning_curvature.models.MLP`: the ``Linear`` layers of ``model.net``."""
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Sequential):
        raise ArgumentError(f"`model` must be an MLP with a `net` Sequential, got {type(model)}")
    layers = [
        ChainLayer(f"net.{i}") for i, m in enumerate(net) if isinstance(m, nn.Linear)
    ]
    return chain_spec(layers, _shapes(model))


def lenet5_spec(model: nn.Module) -> PermutationSpec:
    """Spec of :class:`~lightning_curvature.models.LeNet5`: 2 conv + 3 linear layers.

    The 16 channels of the second conv reach ``classifier.1`` through a flatten of their 5x5
    maps, so that layer consumes them in blocks of 25 inputs.
    """
    shapes = _shapes(model)
    conv2 = shapes.get("features.3.weight")
    fc1 = shapes.get("classifier.1.weight")
    if conv2 is None or fc1 is None:
        raise ArgumentError(f"`model` must be a LeNet5, got {type(model).__name__}")
    block = fc1[1] // conv2[0]
    layers = [
        ChainLayer("features.0"),
        ChainLayer("features.3"),
        ChainLayer("classifier.1", in_block=block),
        ChainLayer("classifier.3"),
        ChainLayer("classifier.5"),
    ]
    return chain_spec(layers, shapes)


def _is_model_class(model: nn.Module, name: str) -> bool:
    # Matched by class (and subclasses) without importing `models`: its package also exports the
    # Lightning classifier, and the engine layers never import Lightning.
    return any(
        c.__name__ == name and c.__module__ == "lightning_curvature.models.networks"
        for c in type(model).__mro__
    )


def spec_for_module(model: nn.Module) -> PermutationSpec:
    """The spec of ``model``: the adapters for MLP and LeNet5, else :func:`infer_chain`."""
    if _is_model_class(model, "MLP"):
        return mlp_spec(model)
    if _is_model_class(model, "LeNet5"):
        return lenet5_spec(model)
    return chain_spec(infer_chain(model), _shapes(model))
