"""Hessian-vector products of the mean loss over a measurement set.

For the sample-weighted mean loss ``L(θ) = Σ_b (n_b/N) L_b(θ)`` the operator applies
``H v = ∇²L(θ) v`` without forming ``H`` (Pearlmutter, *Fast exact multiplication by the
Hessian*, Neural Computation 1994). Two exact routes:

- ``"double_backward"``: ``g = ∇L`` with ``create_graph=True``, then ``H v = ∇(gᵀv)``, one
  backward pass through the gradient graph. The graph is kept between products (see
  :mod:`.model_operator`), so a second product at the same point costs one backward pass only.
- ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` (forward-mode through the
  gradient computation); nothing is kept, every product re-runs the forward pass.

``method="auto"`` picks double backward except for float64 convolutions on CPU, whose double
backward is an order of magnitude slower than their forward-mode derivative (measured in
``benchmarks/engine.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from .batches import Batch
from .functional import LossFn, module_mode
from .model_operator import (
    DEFAULT_GRAPH_MEMORY_BUDGET,
    ModelCurvatureOperator,
    ReduceFn,
    batched_grad,
)

__all__ = ["HessianOperator"]

_METHODS = ("auto", "double_backward", "forward_over_reverse")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)


class HessianOperator(ModelCurvatureOperator):
    """The Hessian ``∇²L(θ)`` of the mean loss over ``data`` as a linear operator.

    Parameters
    ----------
    model, loss_fn, data, params, eval_mode, reduce_fn, graph_memory_budget, check_determinism,
    vectorize_matmat
        See :class:`~lightning_curvature.curvature.model_operator.ModelCurvatureOperator`.
    method : {"auto", "double_backward", "forward_over_reverse"}
        How products are computed (module docstring).

    Attributes
    ----------
    dim, dtype, device, layout : the flat parameter space.
    num_matvecs : int
        Products taken so far (a ``matmat`` with ``k`` columns counts ``k``).

    Examples
    --------
    >>> op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))  # doctest: +SKIP
    >>> hv = op @ v                                                  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: object,
        *,
        params: Any = None,
        eval_mode: bool | None = True,
        reduce_fn: ReduceFn | None = None,
        method: str = "auto",
        graph_memory_budget: int | None = DEFAULT_GRAPH_MEMORY_BUDGET,
        check_determinism: bool = True,
        vectorize_matmat: bool = False,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            eval_mode=eval_mode,
            reduce_fn=reduce_fn,
            graph_memory_budget=graph_memory_budget,
            check_determinism=check_determinism,
            vectorize_matmat=vectorize_matmat,
        )
        if method == "auto":
            slow_conv = (
                self.dtype == torch.float64
                and self.device.type == "cpu"
                and any(isinstance(m, _CONV) for m in model.modules())
            )
            method = "forward_over_reverse" if slow_conv else "double_backward"
        self.method = method

    # -- double backward ---------------------------------------------------------------------
    def _build(self, theta: Tensor, batch: Batch, weight: float) -> Tensor:
        loss = self._floss(theta, batch) * weight
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        return g

    def _apply(self, theta: Tensor, graphs: list[Any], rows: Tensor, batched: bool) -> Tensor:
        if batched:
            (out,) = batched_grad(graphs, [theta], [rows] * len(graphs), batched=True)
            return out
        (out,) = batched_grad(graphs, [theta], [rows[0]] * len(graphs), batched=False)
        return out[None, :]

    # -- forward over reverse ----------------------------------------------------------------
    def _products(self, rows: Tensor, batched: bool) -> Tensor:
        if self.method == "double_backward":
            return super()._products(rows, batched)
        batched = self.vectorize_matmat and rows.shape[0] > 1
        out = torch.zeros_like(rows)
        theta = self._theta
        with module_mode(self.model, self.eval_mode):
            for (inputs, targets), w in zip(self.data.batches, self._weights, strict=True):
                out = out + self._forward_over_reverse(theta, inputs, targets, w, rows, batched)
        self.num_matvecs += int(rows.shape[0])
        return self._reduce(out.detach())

    def _forward_over_reverse(
        self, theta: Tensor, inputs: object, targets: object, weight: float, rows: Tensor, batched
    ) -> Tensor:
        floss = self._floss
        # Float targets ride along as primals with zero tangents: torch.func's jvp through a
        # mean-reduced MSELoss otherwise writes into an immutable zero tangent (torch 2.13).
        if isinstance(targets, Tensor) and targets.is_floating_point():

            def loss_of(th: Tensor, y: Tensor) -> Tensor:
                return floss(th, (inputs, y)) * weight

            zero = torch.zeros_like(targets)

            def hvp(v: Tensor) -> Tensor:
                return jvp(grad(loss_of), (theta, targets), (v, zero))[1]

        else:

            def loss_only(th: Tensor) -> Tensor:
                return floss(th, (inputs, targets)) * weight

            def hvp(v: Tensor) -> Tensor:
                return jvp(grad(loss_only), (theta,), (v,))[1]

        if batched:
            return vmap(hvp)(rows)
        return torch.stack([hvp(r) for r in rows])
