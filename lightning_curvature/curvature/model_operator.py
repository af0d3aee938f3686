"""Common machinery of the model-curvature operators (Hessian, GGN).

An operator is fixed at one point: the model's trainable parameters (a detached copy) and its
buffers at construction. Products run through :class:`FunctionalLoss`, so the module itself is
never written (parameters, buffers, ``.grad``); its train/eval mode is switched only inside
:func:`module_mode` and restored.

*Graph reuse.* Every product at the same point differentiates the same gradient (or output) graph.
Building that graph costs about one gradient evaluation; each product through a kept graph is one
extra backward pass. Graphs of the first batches are therefore kept while the bytes their saved
tensors occupy stay under ``graph_memory_budget``; batches past the budget are rebuilt for every
``matvec``/``matmat`` call (a ``matmat`` call builds them once for all its columns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .batches import Batch, as_batch_set
from .functional import FunctionalLoss, LossFn, module_mode
from .operators import to_scipy
from .params import ParameterLayout

__all__ = ["ModelCurvatureOperator", "ReduceFn", "batched_grad"]

ReduceFn = Callable[[Tensor], Tensor]

#: Default cap on the autograd graphs an operator keeps alive between products.
DEFAULT_GRAPH_MEMORY_BUDGET = 2 * 1024**3


class _SavedBytes:
    """Counts the bytes of tensors autograd saves for backward (a graph's memory)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()

    def pack(self, t: Tensor) -> Tensor:
        key = id(t.untyped_storage()) if t.device.type != "meta" else id(t)
        if key not in self._seen:
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def batched_grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    *,
    batched: bool,
) -> tuple[Tensor, ...]:
    """Vector-Jacobian products through a retained graph, ``grad_outputs`` batched on dim 0 or not.

    With ``batched`` every ``grad_outputs`` tensor has a leading probe dimension; autograd's
    ``is_grads_batched`` (vmap over the backward pass) is tried first and a Python loop is the
    fallback for ops without batching rules. Unused inputs give zeros.
    """
    outputs, inputs, grad_outputs = list(outputs), list(inputs), list(grad_outputs)
    if not batched:
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True
        )
        return tuple(
            torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs, strict=True)
        )
    k = grad_outputs[0].shape[0]
    try:
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        return tuple(
            torch.zeros((k, *i.shape), dtype=i.dtype, device=i.device) if g is None else g
            for g, i in zip(grads, inputs, strict=True)
        )
    except RuntimeError:
        cols = [
            batched_grad(outputs, inputs, [g[j] for g in grad_outputs], batched=False)
            for j in range(k)
        ]
        return tuple(torch.stack([c[i] for c in cols]) for i in range(len(inputs)))


class ModelCurvatureOperator:
    """Base class: data handling, weights, counting, the SciPy bridge, graph caching.

    Subclasses implement :meth:`_build` (one batch's retained graph) and :meth:`_apply` (products
    through a list of such graphs).

    Parameters
    ----------
    model : nn.Module
        The network; never mutated.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar mean loss``.
    data : (inputs, targets) or iterable of batches or BatchSet
        The measurement set; gathered once onto the parameters' device, floating tensors cast to
        the parameters' dtype. The operator is the curvature of the sample-weighted mean loss.
    params : iterable of tensors or names, optional
        Restrict to these parameters (default: all trainable ones).
    eval_mode : bool or None
        Mode during products: eval (default), train, or ``None`` to leave the model's mode.
    reduce_fn : callable, optional
        Sums a tensor over distributed processes (DDP). Each rank passes its shard as ``data``;
        batch weights become ``n_b / reduce_fn(n_local)`` and products are ``reduce_fn``-summed.
    graph_memory_budget : int, optional
        Bytes of autograd graphs kept between products (``0`` disables reuse).
    check_determinism : bool
        Run two forward passes on the first batch and raise
        :class:`~lightning_curvature.curvature.NondeterministicModelError` if they differ.
    vectorize_matmat : bool
        Push all ``matmat`` columns through one vmapped backward pass (``is_grads_batched``)
        instead of one backward pass per column. On CPU the loop measured faster (vmapped
        convolution backward is slow); on GPUs vectorizing can pay off.
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
        graph_memory_budget: int | None = DEFAULT_GRAPH_MEMORY_BUDGET,
        check_determinism: bool = True,
        vectorize_matmat: bool = False,
    ) -> None:
        if graph_memory_budget is not None and graph_memory_budget < 0:
            raise ValueError(f"graph_memory_budget must be >= 0 bytes, got {graph_memory_budget}")
        if eval_mode not in (True, False, None):
            raise ValueError(f"eval_mode must be True, False or None, got {eval_mode!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.layout = ParameterLayout.from_module(model, params)
        first = self.layout.parameters(model)[0]
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.dim: int = self.layout.dim
        self.eval_mode = eval_mode
        self.reduce_fn = reduce_fn
        self.graph_memory_budget = graph_memory_budget
        self.vectorize_matmat = vectorize_matmat
        self.data = as_batch_set(data, device=self.device, dtype=self.dtype)
        self._floss = FunctionalLoss(model, loss_fn, self.layout)
        self._theta = self.layout.flat_values(model)
        local_n = torch.tensor(float(self.data.num_samples), dtype=torch.float64)
        global_n = float(self._reduce(local_n.to(self.device)))
        self.num_samples_global = int(round(global_n))
        self._weights = [s / global_n for s in self.data.sizes]
        self.num_matvecs = 0
        self._cache: list[Any] | None = None
        self._cached_batches = 0
        self.graph_bytes = 0
        if check_determinism:
            with module_mode(model, eval_mode):
                self._floss.check_deterministic(self._theta, self.data.batches[0])

    # -- public interface ------------------------------------------------------------------
    @property
    def point(self) -> Tensor:
        """The flat parameter vector the operator is evaluated at (a detached copy)."""
        return self._theta

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for a flat vector ``v`` of length ``dim``."""
        if v.dim() != 1 or v.shape[0] != self.dim:
            raise ValueError(f"v must have shape ({self.dim},), got {tuple(v.shape)}")
        return self._products(v.detach().to(self.device, self.dtype)[None, :], batched=False)[0]

    def matmat(self, matrix: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(dim, k)``; all columns share each graph traversal."""
        if matrix.dim() != 2 or matrix.shape[0] != self.dim:
            raise ValueError(f"V must have shape ({self.dim}, k), got {tuple(matrix.shape)}")
        if matrix.shape[1] == 0:
            return matrix.new_zeros(self.dim, 0)
        rows = matrix.detach().to(self.device, self.dtype).T.contiguous()
        return self._products(rows, batched=self.vectorize_matmat and matrix.shape[1] > 1).T

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        return to_scipy(self)

    def release(self) -> None:
        """Drop the kept autograd graphs (they are rebuilt on the next product)."""
        self._cache = None
        self._cached_batches = 0
        self.graph_bytes = 0

    def to_dense(self) -> Tensor:
        """The full ``dim x dim`` matrix (``dim`` products; small models only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    # -- machinery -------------------------------------------------------------------------
    def _reduce(self, t: Tensor) -> Tensor:
        return t if self.reduce_fn is None else self.reduce_fn(t)

    def _leaf(self) -> Tensor:
        return self._theta.detach().clone().requires_grad_(True)

    def _build(self, theta: Tensor, batch: Batch, weight: float) -> Any:
        raise NotImplementedError

    def _apply(self, theta: Tensor, graphs: list[Any], rows: Tensor, batched: bool) -> Tensor:
        raise NotImplementedError

    def _ensure_cache(self) -> None:
        if self._cache is not None:
            return
        budget = self.graph_memory_budget
        theta = self._leaf()
        graphs: list[Any] = []
        used = 0
        if budget is None or budget > 0:
            with module_mode(self.model, self.eval_mode), torch.enable_grad():
                for batch, w in zip(self.data.batches, self._weights, strict=True):
                    counter = _SavedBytes()
                    with counter.hooks():
                        graph = self._build(theta, batch, w)
                    if budget is not None and used + counter.total > budget:
                        break
                    graphs.append(graph)
                    used += counter.total
        self._cache = [theta, graphs]
        self._cached_batches = len(graphs)
        self.graph_bytes = used

    def _apply_rows(self, theta: Tensor, graphs: list[Any], rows: Tensor, batched: bool) -> Tensor:
        if batched or rows.shape[0] == 1:
            return self._apply(theta, graphs, rows, batched)
        return torch.cat([self._apply(theta, graphs, r[None, :], False) for r in rows])

    def _products(self, rows: Tensor, batched: bool) -> Tensor:
        """Products for ``rows`` (``k x dim``, one probe per row), summed over batches/ranks."""
        self._ensure_cache()
        assert self._cache is not None
        theta, graphs = self._cache
        out = torch.zeros_like(rows)
        with module_mode(self.model, self.eval_mode), torch.enable_grad():
            if graphs:
                out = out + self._apply_rows(theta, graphs, rows, batched)
            rest = list(zip(self.data.batches, self._weights, strict=True))[len(graphs) :]
            for batch, w in rest:
                fresh = self._leaf()
                out = out + self._apply_rows(fresh, [self._build(fresh, batch, w)], rows, batched)
        self.num_matvecs += int(rows.shape[0])
        return self._reduce(out.detach())
