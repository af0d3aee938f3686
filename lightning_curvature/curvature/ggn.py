"""Generalized Gauss–Newton products ``G v = Jᵀ H_L J v``.

With ``f(θ)`` the network outputs on a batch and ``ℓ(f)`` the loss as a function of the outputs,
``∇²L = Jᵀ ∇²ℓ J + Σ_k (∂ℓ/∂f_k) ∇²f_k``. The first term is the GGN (Schraudolph, *Fast
curvature matrix-vector products for second-order gradient descent*, Neural Computation 2002):
positive semidefinite whenever ``ℓ`` is convex in the outputs, and equal to the Fisher information
for cross-entropy (softmax) and MSE (Martens, *New insights and perspectives on the natural
gradient method*, JMLR 2020). ``H − G`` is the residual, error-dependent part of the Hessian.

Per batch three passes through kept graphs (all exact, no finite differences):

1. ``J v``: the outputs' vector-Jacobian map ``u ↦ Jᵀu`` is built once with ``create_graph`` on a
   dummy ``u``; differentiating ``(Jᵀu)·v`` in ``u`` gives ``J v`` (the double-vjp trick);
2. ``H_L (J v)``: one backward through the graph of ``∇_f ℓ``;
3. ``Jᵀ(·)``: one backward through the outputs' graph.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .batches import Batch
from .model_operator import ModelCurvatureOperator, batched_grad

__all__ = ["GGNOperator"]


class _BatchGraphs(NamedTuple):
    outputs: Tensor  # f(θ), graph to θ
    dummy: Tensor  # u, same shape as outputs
    jtu: list[tuple[Tensor, int]]  # (Jᵀu)_i per parameter i it reaches, graph to u (and θ)
    detached: Tensor  # f(θ) detached, the leaf ∇_f ℓ is taken at
    loss_grad: Tensor  # (n_b/N) ∇_f ℓ, graph to `detached`


class GGNOperator(ModelCurvatureOperator):
    """The generalized Gauss–Newton matrix of the mean loss over ``data`` as a linear operator.

    Same constructor and interface as :class:`~lightning_curvature.curvature.HessianOperator`
    (without ``method``). The model's forward pass must return one tensor.
    """

    def _build(self, theta: tuple[Tensor, ...], batch: Batch, weight: float) -> _BatchGraphs:
        inputs, targets = batch
        outputs = self._floss.outputs(theta, inputs)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"GGNOperator needs the model to return one tensor, got {type(outputs).__name__}"
            )
        dummy = torch.zeros_like(outputs, requires_grad=True)
        grads = torch.autograd.grad(outputs, theta, dummy, create_graph=True, allow_unused=True)
        jtu = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        detached = outputs.detach().requires_grad_(True)
        loss = self.loss_fn(detached, targets) * weight
        (loss_grad,) = torch.autograd.grad(loss, detached, create_graph=True)
        return _BatchGraphs(outputs, dummy, jtu, detached, loss_grad)

    def _apply(
        self, theta: tuple[Tensor, ...], graphs: list[Any], rows: Tensor, batched: bool
    ) -> Tensor:
        probes = self._parts(rows if batched else rows[0])
        # A batch contributes nothing when no parameter reaches the outputs, or when the loss is
        # linear in them (∇_f ℓ is then a constant without a graph: H_L = 0).
        live = [g for g in graphs if g.jtu and g.loss_grad.requires_grad]
        if not live:  # G = 0
            return torch.zeros_like(rows)
        # J v = d/du [(Jᵀu)·v]: every parameter's part of Jᵀu against its part of v.
        jv = batched_grad(
            [t for g in live for t, _ in g.jtu],
            [g.dummy for g in live],
            [probes[i] for g in live for _, i in g.jtu],
            batched=batched,
        )
        hjv = batched_grad(
            [g.loss_grad for g in live], [g.detached for g in live], list(jv), batched=batched
        )
        out = batched_grad([g.outputs for g in live], list(theta), list(hjv), batched=batched)
        flat = self._flat(out)
        return flat if batched else flat[None, :]
