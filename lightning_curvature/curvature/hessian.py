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

``method="auto"``: double backward (cheapest first product), but forward over reverse for
float64 convolution nets on CPU. For float32 convolution nets on CPU it switches to ``linearize``
when a ``matmat`` asks for at least ``LINEARIZE_BLOCK`` products at once, or once more than
``LINEARIZE_AFTER`` products were taken one by one (ski-rental rule: tracing costs about as much
as the savings of that many products), provided every batch's graph fit the memory budget and
torch.func can trace the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, linearize, vmap

from .batches import Batch
from .functional import LossFn, module_mode
from .model_operator import (
    DEFAULT_GRAPH_MEMORY_BUDGET,
    ModelCurvatureOperator,
    ReduceFn,
    batched_grad,
)

__all__ = ["HessianOperator"]

_METHODS = ("auto", "double_backward", "forward_over_reverse", "linearize")

#: ``auto`` on CPU convolution nets switches to ``linearize`` after this many products ...
LINEARIZE_AFTER = 24
#: ... or at once when a single ``matmat`` asks for at least this many.
LINEARIZE_BLOCK = 16
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)


class HessianOperator(ModelCurvatureOperator):
    """The Hessian ``∇²L(θ)`` of the mean loss over ``data`` as a linear operator.

    Parameters
    ----------
    model, loss_fn, data, params, eval_mode, reduce_fn, graph_memory_budget, check_determinism,
    vectorize_matmat
        See :class:`~lightning_curvature.curvature.model_operator.ModelCurvatureOperator`.
    method : {"auto", "double_backward", "forward_over_reverse", "linearize"}
        How products are computed (module docstring). ``self.method`` holds the route in use.

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
        auto = method == "auto"
        if auto:
            slow_conv = (
                self.dtype == torch.float64
                and self.device.type == "cpu"
                and any(isinstance(m, _CONV) for m in model.modules())
            )
            method = "forward_over_reverse" if slow_conv else "double_backward"
        self.method = method
        self._linearized: list[tuple[Any, tuple]] | None = None
        has_conv = any(isinstance(m, _CONV) for m in model.modules())
        self._linearize_after: int | None = (
            LINEARIZE_AFTER
            if auto and has_conv and self.device.type == "cpu" and method == "double_backward"
            else None
        )

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
        if self.method == "double_backward" and self._linearize_after is not None:
            if (
                self.num_matvecs + rows.shape[0] > self._linearize_after
                or rows.shape[0] >= LINEARIZE_BLOCK
            ):
                self._try_linearize()
        if self.method == "double_backward":
            return super()._products(rows, batched)
        batched = self.vectorize_matmat and rows.shape[0] > 1
        if self.method == "linearize" and self._linearized is None:
            with module_mode(self.model, self.eval_mode):
                self._linearized = [self._linearize(b, w) for b, w in self._weighted_batches()]
        out = torch.zeros_like(rows)
        with module_mode(self.model, self.eval_mode):
            if self.method == "linearize":
                assert self._linearized is not None
                for fn, extra in self._linearized:
                    zeros = tuple(torch.zeros_like(e) for e in extra)
                    out = out + torch.stack([fn(r, *zeros) for r in rows])
            else:
                for (inputs, targets), w in self._weighted_batches():
                    out = out + self._forward_over_reverse(inputs, targets, w, rows, batched)
        self.num_matvecs += int(rows.shape[0])
        return self._reduce(out.detach())

    def _weighted_batches(self) -> list[tuple[Batch, float]]:
        return list(zip(self.data.batches, self._weights, strict=True))

    def _linearize(self, batch: Batch, weight: float) -> tuple[Any, tuple]:
        f, extra = self._loss_closure(batch[0], batch[1], weight)
        _, fn = linearize(grad(f), self._theta, *extra)
        return fn, extra

    def _try_linearize(self) -> None:
        """Switch ``auto`` from double backward to ``linearize`` once many products are taken.

        Only when the kept double-backward graphs cover the whole data set (the linearized
        program holds comparable memory). A model torch.func cannot trace stays on double
        backward.
        """
        self._linearize_after = None
        self._ensure_cache()  # builds the graphs only to measure them against the budget
        if self._cached_batches != len(self.data.batches):
            return
        try:
            with module_mode(self.model, self.eval_mode):
                fns = [self._linearize(b, w) for b, w in self._weighted_batches()]
        except Exception:  # noqa: BLE001 - any tracing failure means: keep double backward
            return
        self._linearized = fns
        self.method = "linearize"
        self.release()

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
