"""One flat parameter vector in a fixed order, shared by every layer of the package.

The convention (``docs/architecture.md``): the trainable parameters of a module, in
``named_parameters()`` order, concatenated into one vector of length ``dim``. Every operator,
estimator, sampler, direction and optimizer in the package speaks this layout, so a vector
produced by one (an eigenvector, a random direction, an SGLD draw) can be fed to another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParameterLayout"]


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of the parameters that make up the flat vector.

    Build one with :meth:`from_module`. The layout is a pure description: it holds no tensors,
    so it is cheap to keep and safe to share.

    Attributes
    ----------
    names : tuple of str
        Parameter names as in ``module.named_parameters()`` (the keys ``functional_call`` expects).
    shapes : tuple of torch.Size
        Shape of each parameter.
    numels : tuple of int
        Number of elements of each parameter.
    offsets : tuple of int
        Start of each parameter in the flat vector.
    dim : int
        Length of the flat vector.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    dim: int

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        params: Iterable[Tensor] | Iterable[str] | None = None,
    ) -> ParameterLayout:
        """Layout of ``module``'s trainable parameters (or the subset ``params``).

        Parameters
        ----------
        module : nn.Module
            The model.
        params : iterable of tensors or of names, optional
            Restrict to these parameters (given as the parameter tensors themselves or by name).
            They are still ordered as in ``named_parameters()``. Default: every parameter with
            ``requires_grad=True``.
        """
        named = list(module.named_parameters())
        if params is None:
            chosen = [(n, p) for n, p in named if p.requires_grad]
        else:
            wanted = list(params)
            if all(isinstance(w, str) for w in wanted):
                wanted_names = set(wanted)
                unknown = wanted_names - {n for n, _ in named}
                if unknown:
                    raise ValueError(
                        f"params: unknown parameter names {sorted(unknown)}; "
                        f"the module has {[n for n, _ in named]}"
                    )
                chosen = [(n, p) for n, p in named if n in wanted_names]
            elif all(isinstance(w, Tensor) for w in wanted):
                ids = {id(w) for w in wanted}
                chosen = [(n, p) for n, p in named if id(p) in ids]
                if len(chosen) != len(ids):
                    raise ValueError("params: some tensors are not parameters of the module")
            else:
                raise ValueError("params: give either parameter tensors or parameter names")
        if not chosen:
            raise ValueError("the module has no trainable parameters to measure")
        names = tuple(n for n, _ in chosen)
        shapes = tuple(p.shape for _, p in chosen)
        numels = tuple(p.numel() for _, p in chosen)
        offsets, total = [], 0
        for k in numels:
            offsets.append(total)
            total += k
        return cls(names, shapes, numels, tuple(offsets), total)

    # -- module access ---------------------------------------------------------------------
    def parameters(self, module: nn.Module) -> list[Tensor]:
        """The module's parameter tensors in layout order."""
        lookup = dict(module.named_parameters())
        return [lookup[n] for n in self.names]

    def flat_values(self, module: nn.Module) -> Tensor:
        """A detached copy of the module's current parameter values as one flat vector."""
        return self.flatten([p.detach() for p in self.parameters(module)])

    def frozen_params(self, module: nn.Module) -> dict[str, Tensor]:
        """Detached parameters *outside* the layout (for ``functional_call``)."""
        inside = set(self.names)
        return {n: p.detach() for n, p in module.named_parameters() if n not in inside}

    # -- conversions -----------------------------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (list in layout order, or dict by name).

        Leading batch dimensions are kept: tensors of shape ``(*batch, *shape_i)`` give
        ``(*batch, dim)``.
        """
        if isinstance(tensors, Mapping):
            tensors = [tensors[n] for n in self.names]
        if len(tensors) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors, got {len(tensors)}")
        parts = []
        for t, shape, k in zip(tensors, self.shapes, self.numels, strict=True):
            batch = t.shape[: t.dim() - len(shape)]
            parts.append(t.reshape(*batch, k))
        return torch.cat(parts, dim=-1)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector ``(*batch, dim)`` into ``{name: (*batch, *shape)}`` views."""
        if vec.shape[-1] != self.dim:
            raise ValueError(
                f"expected a vector of length {self.dim}, got shape {tuple(vec.shape)}"
            )
        batch = vec.shape[:-1]
        return {
            n: vec[..., o : o + k].reshape((*batch, *shape))
            for n, shape, k, o in zip(
                self.names, self.shapes, self.numels, self.offsets, strict=True
            )
        }

    def slices(self) -> dict[str, slice]:
        """Where each parameter lives in the flat vector."""
        return {
            n: slice(o, o + k)
            for n, k, o in zip(self.names, self.numels, self.offsets, strict=True)
        }
