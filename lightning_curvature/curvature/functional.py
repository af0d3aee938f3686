"""The loss as a pure function of the flat parameter vector, and guards for the module's state.

Everything that evaluates the model at parameters other than its own (HVPs, SGLD draws, loss
grids, per-sample gradients) goes through :class:`FunctionalLoss`, which calls the module with
``torch.func.functional_call``: the module's parameters and buffers are never written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .batches import Batch, BatchSet
from .params import ParameterLayout

__all__ = [
    "FunctionalLoss",
    "LossFn",
    "NondeterministicModelError",
    "call_module",
    "module_mode",
]

#: ``loss_fn(outputs, targets) -> scalar mean loss``; the one definition in the package.
LossFn = Callable[[object, object], Tensor]


class NondeterministicModelError(RuntimeError):
    """The model's forward pass gives different outputs for the same input and parameters."""


@contextmanager
def module_mode(module: nn.Module, eval_mode: bool | None) -> Iterator[nn.Module]:
    """Put ``module`` in eval (``True``) or train (``False``) mode, or leave it (``None``).

    The ``training`` flag of every submodule is restored on exit, including mixed states such as
    a frozen BatchNorm inside a model in train mode.
    """
    saved = [(m, m.training) for m in module.modules()]
    try:
        if eval_mode is True:
            module.eval()
        elif eval_mode is False:
            module.train()
        yield module
    finally:
        for m, was_training in saved:
            m.training = was_training


def call_module(module: nn.Module, tensors: dict[str, Tensor], inputs: object) -> object:
    """``functional_call`` with ``inputs`` as a tensor, a tuple/list of args or a dict of kwargs."""
    if isinstance(inputs, dict):
        return functional_call(module, tensors, args=(), kwargs=inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(module, tensors, tuple(inputs))
    return functional_call(module, tensors, (inputs,))


class FunctionalLoss:
    """``loss(theta, batch)`` with ``theta`` a flat vector in a :class:`ParameterLayout`.

    Buffers (BatchNorm statistics) and parameters outside the layout are snapshotted (cloned,
    detached) at construction, so a forward pass in train mode cannot write into the module (nor,
    since train-mode calls get copies, into the snapshot).
    The module's train/eval mode at *call* time decides BatchNorm/dropout behaviour; wrap calls in
    :func:`module_mode`.

    Parameters
    ----------
    module : nn.Module
        The model (never mutated).
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar mean loss``.
    layout : ParameterLayout, optional
        Which parameters ``theta`` holds. Default: all trainable parameters.
    """

    def __init__(
        self, module: nn.Module, loss_fn: LossFn, layout: ParameterLayout | None = None
    ) -> None:
        self.module = module
        self.loss_fn = loss_fn
        self.layout = layout if layout is not None else ParameterLayout.from_module(module)
        self._buffers: dict[str, Tensor] = {
            n: t.detach().clone() for n, t in module.named_buffers()
        }
        self._frozen: dict[str, Tensor] = self.layout.frozen_params(module)

    def fixed_tensors(self) -> dict[str, Tensor]:
        """Buffers and frozen parameters for ``functional_call`` (everything but ``theta``).

        Buffers are handed out as fresh copies when a submodule is in train mode: BatchNorm then
        updates its running statistics in place, which must not leak into the snapshot (a later
        eval-mode call would see them) nor into a captured tensor under ``torch.func``.
        """
        training = any(m.training for m in self.module.modules())
        buffers = {n: b.clone() for n, b in self._buffers.items()} if training else self._buffers
        return {**buffers, **self._frozen}

    def tensors(self, theta: Tensor | Sequence[Tensor]) -> dict[str, Tensor]:
        """The full ``functional_call`` dictionary for parameters ``theta``.

        ``theta`` is the flat vector, or one tensor per parameter in layout order (e.g. separate
        autograd leaves: differentiating through slices of a flat leaf would make every backward
        pass write one full-size zero tensor per parameter).
        """
        if isinstance(theta, Tensor):
            return {**self.fixed_tensors(), **self.layout.unflatten(theta)}
        if len(theta) != len(self.layout.names):
            raise ValueError(f"expected {len(self.layout.names)} tensors, got {len(theta)}")
        return {**self.fixed_tensors(), **dict(zip(self.layout.names, theta, strict=True))}

    def outputs(self, theta: Tensor | Sequence[Tensor], inputs: object) -> object:
        """Model outputs at parameters ``theta`` (flat, or one tensor per parameter)."""
        return call_module(self.module, self.tensors(theta), inputs)

    def __call__(self, theta: Tensor | Sequence[Tensor], batch: Batch) -> Tensor:
        """Mean loss of one batch at parameters ``theta``."""
        inputs, targets = batch
        return self.loss_fn(self.outputs(theta, inputs), targets)

    def mean_loss(self, theta: Tensor, data: BatchSet) -> Tensor:
        """Sample-weighted mean loss over every batch of ``data`` (differentiable in ``theta``)."""
        total = None
        for batch, w in data.weighted():
            term = self(theta, batch) * w
            total = term if total is None else total + term
        assert total is not None
        return total

    def check_deterministic(self, theta: Tensor, batch: Batch) -> None:
        """Raise :class:`NondeterministicModelError` if two forward passes disagree.

        Runs under ``torch.random.fork_rng`` so the global RNG streams are left as they were.
        A model with dropout left on (train mode) is the usual cause.
        """
        devices = [theta.device.index or 0] if theta.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            first = self(theta, batch)
            second = self(theta, batch)
        if not torch.equal(first, second):
            raise NondeterministicModelError(
                "the model's loss differs between two forward passes at the same parameters "
                f"({first.item():.6g} vs {second.item():.6g}); curvature is undefined for a "
                "random function. Measure in eval mode (eval_mode=True) or disable dropout."
            )
