"""Hessian-vector products of the mean loss over a measurement set.

For the sample-weighted mean loss ``L(θ) = Σ_b (n_b/N) L_b(θ)`` the operator applies
``H v = ∇²L(θ) v`` without forming ``H`` (Pearlmutter, *Fast exact multiplication by the
Hessian*, Neural Computation 1994). Three exact routes:

- ``"double_backward"``: ``g = ∇L`` with ``create_graph=True``, then ``H v = ∇(gᵀv)``, one
  backward pass through the gradient graph. The graph is kept between products (see
  :mod:`.model_operator`), so a further product at the same point costs one backward pass.
- ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` (forward mode through the
  gradient computation); nothing is kept, every product re-runs the forward pass.
- ``"linearize"``: ``torch.func.linearize`` of the gradient traces the tangent program once (about
  7–17 gradient evaluations on CPU) with the primal values folded in as constants; each product
  then costs about one gradient evaluation.

Measured on CPU, float32, 2,048 samples (``benchmarks/engine.py``): a kept double-backward graph
gives products at ~1.0x a gradient for an MLP but ~2.2x for LeNet-5, because PyTorch's
convolution double backward also computes the (unneeded) input-gradient term of the first layer
with a slow single-channel transposed convolution; linearize gives ~1.1x there. Double backward
through float64 convolutions on CPU is far slower than forward mode.

``method="auto"`` picks the route once, at construction, from the device, dtype and model
(never changed afterwards): forward over reverse for float64 convolution nets on CPU; for
float32 convolution nets on CPU ``linearize`` when the graphs of all batches fit the memory
budget (estimated from the first batch) and torch.func can trace the model, since every
estimator takes dozens of products; double backward otherwise.

*Block products.* All ``k`` columns of a ``matmat`` share each traversal. With
``vectorize_matmat=True`` they go through one vmapped pass (double backward:
``torch.autograd.grad(..., is_grads_batched=True)`` over the kept gradient graph; functional
routes: ``torch.func.vmap`` over the product), otherwise one pass per column. The default
``None`` decides per block size on the real data: the first ``matmat`` of a width class runs half
its columns by each route, times them and keeps the faster for that class (:attr:`block_routes`,
:attr:`block_route_seconds`; see :mod:`.model_operator`).

*What blocking can buy.* Every column has its own direction ``V``, so a block of k products costs
k times the FLOPs of one product; a product through the kept graph needs the same two
``N·in·out`` GEMMs of the first layer as a gradient (``X Vᵀ`` and ``Xᵀ R``), i.e. about one
gradient of arithmetic (MLP 784-128-10: 1.02x). Blocking only raises the GEMM rate, which on a
CPU already near its peak at 128 columns gains little (``benchmarks/engine.py --sections blocks``
prints the measured floor).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, linearize, vmap

from ..checks import check_choice
from .batches import Batch
from .functional import LossFn, module_mode
from .model_operator import (
    DEFAULT_GRAPH_MEMORY_BUDGET,
    ModelCurvatureOperator,
    ReduceFn,
    _SavedBytes,
    batched_grad,
)

__all__ = ["HessianOperator"]

_METHODS = ("auto", "double_backward", "forward_over_reverse", "linearize")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)


class HessianOperator(ModelCurvatureOperator):
    """The Hessian ``∇²L(θ)`` of the mean loss over ``data`` as a linear operator.

    Parameters
    ----------
    model, loss_fn, data, params, eval_mode, reduce_fn, graph_memory_budget, check_determinism,
    vectorize_matmat
        See :class:`~lightning_curvature.curvature.model_operator.ModelCurvatureOperator`.
    method : {"auto", "double_backward", "forward_over_reverse", "linearize"}
        How products are computed (module docstring). ``self.method`` holds the route in use,
        fixed at construction.

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
        vectorize_matmat: bool | None = None,
    ) -> None:
        self._requested_method = check_choice("method", method, _METHODS)
        self._linearized: list[tuple[Any, tuple]] | None = None
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

    def _init_route(self) -> None:
        method = self._requested_method
        if method == "auto":
            method = self._auto_method()
        self.method: str = method

    def _auto_method(self) -> str:
        """The ``auto`` rule of the module docstring (decided once, at construction)."""
        has_conv = any(isinstance(m, _CONV) for m in self.model.modules())
        if not has_conv or self.device.type != "cpu":
            return "double_backward"
        if self.dtype == torch.float64:
            return "forward_over_reverse"
        budget = self.graph_memory_budget
        if budget is not None:
            counter = _SavedBytes()
            with module_mode(self.model, self.eval_mode), torch.enable_grad(), counter.hooks():
                self._build(self._leaf(), self.data.batches[0], self._weights[0])
            if counter.total * len(self.data.batches) > budget:
                return "double_backward"
        try:
            self._ensure_linearized()
        except Exception:  # noqa: BLE001 - any tracing failure means: keep double backward
            self._linearized = None
            return "double_backward"
        return "linearize"

    def _ensure_linearized(self) -> list[tuple[Any, tuple]]:
        if self._linearized is None:
            with module_mode(self.model, self.eval_mode):
                self._linearized = [self._linearize(b, w) for b, w in self._weighted_batches()]
        return self._linearized

    # -- double backward ---------------------------------------------------------------------
    def _build(self, theta: tuple[Tensor, ...], batch: Batch, weight: float) -> list[Any]:
        """``[(g_i, i)]``: the per-parameter gradients that depend on ``theta`` (graphs kept)."""
        loss = self._floss(theta, batch) * weight
        grads = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
        # A parameter the loss does not reach (or reaches only linearly) has no second-order
        # graph: its rows of H are zero, which batched_grad's zeros for unused inputs give.
        return [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def _apply(
        self, theta: tuple[Tensor, ...], graphs: list[Any], rows: Tensor, batched: bool
    ) -> Tensor:
        probes = self._parts(rows if batched else rows[0])
        pairs = [pair for graph in graphs for pair in graph]
        if not pairs:  # the loss is linear in every parameter: H = 0
            return torch.zeros_like(rows)
        out = batched_grad(
            [g for g, _ in pairs], list(theta), [probes[i] for _, i in pairs], batched=batched
        )
        flat = self._flat(out)
        return flat if batched else flat[None, :]

    # -- functional routes -------------------------------------------------------------------
    def _loss_closure(self, inputs: object, targets: object, weight: float) -> tuple[Any, tuple]:
        """``f(θ, *extra)`` for torch.func, with the extra primals it needs.

        Float targets ride along as primals with zero tangents: torch.func's jvp through a
        mean-reduced ``MSELoss`` otherwise writes into an immutable zero tangent (torch 2.13).
        """
        floss = self._floss
        if isinstance(targets, Tensor) and targets.is_floating_point():

            def with_targets(th: Tensor, y: Tensor) -> Tensor:
                return floss(th, (inputs, y)) * weight

            return with_targets, (targets,)

        def loss_only(th: Tensor) -> Tensor:
            return floss(th, (inputs, targets)) * weight

        return loss_only, ()

    def _products(self, rows: Tensor, batched: bool) -> Tensor:
        if self.method == "double_backward":
            return super()._products(rows, batched)
        out = torch.zeros_like(rows)
        with module_mode(self.model, self.eval_mode):
            if self.method == "linearize":
                for fn, extra in self._ensure_linearized():
                    out = out + _linearized_products(fn, extra, rows, batched)
            else:
                for (inputs, targets), w in self._weighted_batches():
                    out = out + self._forward_over_reverse(inputs, targets, w, rows, batched)
        return self._reduce(out.detach())

    def _prepare_products(self) -> None:
        if self.method == "double_backward":
            self._ensure_cache()
        elif self.method == "linearize":
            self._ensure_linearized()

    def _route_products(self, batch: Batch, rows: Tensor) -> Any:
        if self.method == "double_backward":
            return super()._route_products(batch, rows)
        if self.method == "linearize":
            with module_mode(self.model, self.eval_mode):
                fn, extra = self._linearize(batch, 1.0)

            def run_linearized(batched: bool) -> Tensor:
                with module_mode(self.model, self.eval_mode):
                    return _linearized_products(fn, extra, rows, batched)

            return run_linearized

        def run_functional(batched: bool) -> Tensor:
            with module_mode(self.model, self.eval_mode):
                return self._forward_over_reverse(batch[0], batch[1], 1.0, rows, batched)

        return run_functional

    def _weighted_batches(self) -> list[tuple[Batch, float]]:
        return list(zip(self.data.batches, self._weights, strict=True))

    def _linearize(self, batch: Batch, weight: float) -> tuple[Any, tuple]:
        f, extra = self._loss_closure(batch[0], batch[1], weight)
        _, fn = linearize(grad(f), self._theta, *extra)
        return fn, extra

    def _forward_over_reverse(
        self, inputs: object, targets: object, weight: float, rows: Tensor, batched: bool
    ) -> Tensor:
        f, extra = self._loss_closure(inputs, targets, weight)
        primals = (self._theta, *extra)
        zeros = tuple(torch.zeros_like(e) for e in extra)

        def hvp(v: Tensor) -> Tensor:
            return jvp(grad(f), primals, (v, *zeros))[1]

        if batched:
            return vmap(hvp)(rows)
        return torch.stack([hvp(r) for r in rows])


def _linearized_products(fn: Any, extra: tuple, rows: Tensor, batched: bool) -> Tensor:
    """Products through a ``torch.func.linearize`` tangent map, vmapped or one row at a time."""
    zeros = tuple(torch.zeros_like(e) for e in extra)
    if batched:
        return vmap(lambda r: fn(r, *zeros))(rows)
    return torch.stack([fn(r, *zeros) for r in rows])
