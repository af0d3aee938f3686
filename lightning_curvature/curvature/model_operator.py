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

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_bool, check_choice, check_int
from .batches import Batch, as_batch_set
from .functional import FunctionalLoss, LossFn, module_mode
from .operators import CurvatureOperator
from .params import ParameterLayout

__all__ = ["ModelCurvatureOperator", "ReduceFn", "batched_grad", "block_bucket"]

#: ``reduce_fn(t) -> t summed over processes`` (DDP all-reduce); the one definition in the package.
ReduceFn = Callable[[Tensor], Tensor]

#: Samples of the first batch and columns used to time the block routes at construction.
ROUTE_PROBE_SAMPLES = 1024
ROUTE_PROBE_COLUMNS = 8
#: Columns per vmapped pass on the batched route (memory: that many copies of the activations).
MAX_BATCHED_COLUMNS = 32


#: Block routes measured in this process, keyed by :meth:`ModelCurvatureOperator._route_key`:
#: an operator rebuilt at the next epoch (same model, shapes, device) reuses the decision, so
#: the route is measured once per process and stays the same from one measurement to the next.
_ROUTE_CACHE: dict[tuple, tuple[bool, dict[str, float]]] = {}
#: Per-block-size routes measured inside real ``matmat`` calls, keyed by
#: ``(_route_key(), total samples, block bucket)``.
_BLOCK_ROUTE_CACHE: dict[tuple, tuple[bool, dict[str, float]]] = {}


def block_bucket(k: int) -> int:
    """The block-size class of a ``k``-column product: the next power of two, capped.

    Blocks wider than ``MAX_BATCHED_COLUMNS`` run in chunks of that width, so they share its
    class. Routes are decided per class (``1`` never needs a decision).
    """
    width = min(k, MAX_BATCHED_COLUMNS)
    return 1 << max(0, (width - 1).bit_length())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class ModelCurvatureOperator(CurvatureOperator):
    """Base class of the model curvature operators: data, weights, graph caching, block route.

    Subclasses implement :meth:`_build` (one batch's retained graph) and :meth:`_apply` (products
    through a list of such graphs, one probe per row, batched or not); the
    :class:`~lightning_curvature.curvature.operators.CurvatureOperator` base supplies ``@``,
    ``matvec``/``matmat`` with their checks and count, composition and ``to_scipy``.

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
    vectorize_matmat : bool or None
        How a ``matmat`` block goes through a graph: ``True`` pushes all columns through one
        vmapped backward pass (``torch.autograd.grad(..., is_grads_batched=True)``), ``False``
        runs one backward pass per column. ``None`` (default) decides **per block size**, at the
        size actually requested and on the real data: the first ``matmat`` whose width falls in
        a class (:func:`block_bucket`: 2, 4, 8, 16, 32 columns; wider blocks run in chunks of
        ``MAX_BATCHED_COLUMNS``) computes half of its columns one by one and the other half in
        one vmapped pass, times both (per column, graphs already built) and keeps the faster
        route for that class; no product is wasted (two columns always loop). Decisions and
        timings are recorded in :attr:`block_routes` / :attr:`block_route_seconds` and reused
        by later operators of
        the same kind, model class, parameter shapes, dtype, device, input shape and data size
        in this process. A single column always takes the plain route; the batched route
        pushes at most ``MAX_BATCHED_COLUMNS`` columns through one pass (it holds the
        intermediates once per column). With ``reduce_fn`` (DDP) ``None`` means the loop route:
        a per-rank timing could differ between ranks, and every rank must reduce alike.

    Attributes
    ----------
    block_routes : dict
        ``{block class: "batched" | "loop"}`` decided so far (all classes when the route was
        given).
    block_route_seconds : dict
        ``{block class: {"loop": s, "batched": s}}``, seconds per column measured in the
        deciding call.
    block_route : {"batched", "loop"}
        The route at ``ROUTE_PROBE_COLUMNS`` columns, from a short timing of both routes on a
        sub-batch of at most ``ROUTE_PROBE_SAMPLES`` samples of the first batch, taken when
        first read (kept for compatibility and as a quick report; ``matmat`` follows
        :attr:`block_routes`).
    route_seconds : dict
        Seconds per column of each route in that sub-batch timing (empty when the route was
        given).
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
        vectorize_matmat: bool | None = None,
    ) -> None:
        check_int("graph_memory_budget", graph_memory_budget, minimum=0, allow_none=True)
        check_choice("eval_mode", eval_mode, (True, False, None))
        check_bool("vectorize_matmat", vectorize_matmat, allow_none=True)
        check_bool("check_determinism", check_determinism)
        layout = ParameterLayout.from_module(model, params)
        first = layout.parameters(model)[0]
        super().__init__(layout.dim, first.dtype, first.device, layout)
        self.layout: ParameterLayout = layout
        self.model = model
        self.loss_fn = loss_fn
        self.eval_mode = eval_mode
        self.reduce_fn = reduce_fn
        self.graph_memory_budget = graph_memory_budget
        self.data = as_batch_set(data, device=self.device, dtype=self.dtype)
        self._floss = FunctionalLoss(model, loss_fn, self.layout)
        self._theta = self.layout.flat_values(model)
        local_n = torch.tensor(float(self.data.num_samples), dtype=torch.float64)
        global_n = float(self._reduce(local_n.to(self.device)))
        self.num_samples_global = int(round(global_n))
        self._weights = [s / global_n for s in self.data.sizes]
        self._cache: list[Any] | None = None
        self._cached_batches = 0
        self.graph_bytes = 0
        if check_determinism:
            with module_mode(model, eval_mode):
                self._floss.check_deterministic(self._theta, self.data.batches[0])
        self._init_route()
        #: The route given by the caller (``None``: decided per block class by measurement).
        self.vectorize_matmat: bool | None = vectorize_matmat
        self._probe_route: tuple[bool, dict[str, float]] | None = None
        self.block_route_seconds: dict[int, dict[str, float]] = {}
        self.block_routes: dict[int, str] = {}
        if vectorize_matmat is not None:
            label = "batched" if vectorize_matmat else "loop"
            self._probe_route = (vectorize_matmat, {})
            self.block_routes = {1 << i: label for i in range(1, MAX_BATCHED_COLUMNS.bit_length())}

    def _init_route(self) -> None:
        """Fix the product route before the block route is measured (subclass hook)."""

    # -- public interface ------------------------------------------------------------------
    @property
    def point(self) -> Tensor:
        """The flat parameter vector the operator is evaluated at (a detached copy)."""
        return self._theta

    @property
    def block_route(self) -> str:
        """Route at ``ROUTE_PROBE_COLUMNS`` columns from the sub-batch timing (class docstring)."""
        return "batched" if self._sub_batch_route()[0] else "loop"

    @property
    def route_seconds(self) -> dict[str, float]:
        """Seconds per column of each route in the sub-batch timing (empty when given)."""
        return dict(self._sub_batch_route()[1])

    def _sub_batch_route(self) -> tuple[bool, dict[str, float]]:
        if self._probe_route is None:
            key = self._route_key()
            if key not in _ROUTE_CACHE:
                self._seconds: dict[str, float] = {}
                _ROUTE_CACHE[key] = (self._measure_block_route(), dict(self._seconds))
            self._probe_route = _ROUTE_CACHE[key]
        return self._probe_route

    def _matmat(self, matrix: Tensor) -> Tensor:
        rows = matrix.T.contiguous()
        k = rows.shape[0]
        if k == 1:
            return self._products(rows, batched=False).T
        if self.vectorize_matmat is not None:
            return self._block_products(rows, self.vectorize_matmat).T
        if self.reduce_fn is not None:
            # Every rank must make the same reductions: a per-rank timing could differ, and the
            # loop route reduces once per call whatever the width.
            return self._products(rows, batched=False).T
        bucket = block_bucket(k)
        key = (self._route_key(), self.data.num_samples, bucket)
        if key in _BLOCK_ROUTE_CACHE:
            batched, seconds = _BLOCK_ROUTE_CACHE[key]
            self.block_routes[bucket] = "batched" if batched else "loop"
            self.block_route_seconds[bucket] = dict(seconds)
        if bucket in self.block_routes:
            return self._block_products(rows, self.block_routes[bucket] == "batched").T
        if k == 2:  # halves of one column each: nothing to batch, so nothing to measure
            return self._products(rows, batched=False).T
        out, batched, seconds = self._measured_products(rows)
        _BLOCK_ROUTE_CACHE[key] = (batched, seconds)
        self.block_routes[bucket] = "batched" if batched else "loop"
        self.block_route_seconds[bucket] = dict(seconds)
        return out.T

    def _block_products(self, rows: Tensor, batched: bool) -> Tensor:
        if not batched:
            return self._products(rows, batched=False)
        # A vmapped pass holds every intermediate once per column: chunks bound that memory.
        chunks = rows.split(MAX_BATCHED_COLUMNS)
        return torch.cat([self._products(c, batched=c.shape[0] > 1) for c in chunks])

    def _measured_products(self, rows: Tensor) -> tuple[Tensor, bool, dict[str, float]]:
        """All products for ``rows`` by the faster route, timed on half one by one, half vmapped.

        The graphs are built first, so neither half pays for them (batches past the memory
        budget are rebuilt once per call, i.e. once per half: equal halves pay it equally).
        A route that raises is not chosen; its half is then recomputed by the other route.
        """
        self._prepare_products()
        half = rows.shape[0] // 2
        parts, seconds = [], {}
        for label, chunk in (("loop", rows[:half]), ("batched", rows[half:])):
            start = time.perf_counter()
            try:
                parts.append(self._block_products(chunk, label == "batched"))
                _synchronize(self.device)
                seconds[label] = (time.perf_counter() - start) / chunk.shape[0]
            except Exception:  # noqa: BLE001 - a route without batching rules is not chosen
                if label == "loop":
                    raise
                parts.append(self._block_products(chunk, False))
                seconds[label] = math.inf
        batched = seconds["batched"] < seconds["loop"]
        # The two routes round differently: recompute the losing route's half, so a product
        # never depends on whether this process had measured the route before (once per class).
        if batched:
            parts[0] = self._block_products(rows[:half], True)
        elif math.isfinite(seconds["batched"]):
            parts[1] = self._block_products(rows[half:], False)
        return torch.cat(parts), batched, seconds

    def release(self) -> None:
        """Drop the kept autograd graphs (they are rebuilt on the next product)."""
        self._cache = None
        self._cached_batches = 0
        self.graph_bytes = 0

    # -- block route -----------------------------------------------------------------------
    def _probe_batch(self) -> Batch:
        """At most ``ROUTE_PROBE_SAMPLES`` samples of the first batch (tensors sliced)."""
        inputs, targets = self.data.batches[0]
        n = min(ROUTE_PROBE_SAMPLES, self.data.sizes[0])

        def head(t: object) -> object:
            if isinstance(t, Tensor) and t.dim() > 0:
                return t[:n]
            if isinstance(t, (tuple, list)):
                return type(t)(head(u) for u in t)
            if isinstance(t, dict):
                return {k: head(u) for k, u in t.items()}
            return t

        return head(inputs), head(targets)  # type: ignore[return-value]

    def _route_products(self, batch: Batch, rows: Tensor) -> Any:
        """``(loop, batched)`` callables computing products for ``rows`` on ``batch``."""
        theta = self._leaf()
        with module_mode(self.model, self.eval_mode), torch.enable_grad():
            graphs = [self._build(theta, batch, 1.0)]

        def run(batched: bool) -> Tensor:
            with module_mode(self.model, self.eval_mode), torch.enable_grad():
                return self._apply_rows(theta, graphs, rows, batched)

        return run

    def _route_key(self) -> tuple:
        """What the block-route measurement depends on: operator, model, shapes, device, data."""
        inputs = self.data.batches[0][0]
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        return (
            type(self).__qualname__,
            getattr(self, "method", None),
            type(self.model).__qualname__,
            tuple(tuple(s) for s in self.layout.shapes),
            str(self.dtype),
            str(self.device),
            shape[1:] if isinstance(shape, tuple) else shape,
            min(ROUTE_PROBE_SAMPLES, self.data.sizes[0]),
            self.eval_mode,
        )

    def _measure_block_route(self) -> bool:
        """Time both block routes on a sub-batch; ``True`` when the batched one is faster.

        Each route runs twice and the second run is timed (the first pays one-off costs such as
        vmap's batching-rule lookup). A route that raises is never chosen. Randomness comes from
        a private generator, so the global RNG streams are untouched.
        """
        gen = torch.Generator().manual_seed(0)
        rows = torch.randn(ROUTE_PROBE_COLUMNS, self.dim, generator=gen, dtype=torch.float64)
        rows = rows.to(self.device, self.dtype)
        try:
            run = self._route_products(self._probe_batch(), rows)
        except Exception:  # noqa: BLE001 - no measurement possible: keep the plain loop
            return False
        for label, batched in (("loop", False), ("batched", True)):
            try:
                for _ in range(2):
                    start = time.perf_counter()
                    run(batched)
                    _synchronize(self.device)
                    seconds = time.perf_counter() - start
            except Exception:  # noqa: BLE001 - a route without batching rules is not chosen
                seconds = math.inf
            self._seconds[label] = seconds / ROUTE_PROBE_COLUMNS
        return self._seconds["batched"] < self._seconds["loop"]

    # -- machinery -------------------------------------------------------------------------
    def _reduce(self, t: Tensor) -> Tensor:
        return t if self.reduce_fn is None else self.reduce_fn(t)

    def _leaf(self) -> tuple[Tensor, ...]:
        """Fresh autograd leaves at the operator's point, one per parameter tensor.

        Separate leaves rather than one flat leaf sliced inside the graph: the backward of a
        slice writes a full-size zero tensor and copies into it, once per parameter and per
        product (a fifth of an HVP on a 2x256 MLP). Products are flattened at the end
        (:meth:`_flat`), one concatenation.
        """
        return tuple(
            t.detach().clone().requires_grad_(True)
            for t in self.layout.unflatten(self._theta).values()
        )

    def _flat(self, parts: Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors (with or without a leading probe dimension) as flat rows."""
        return self.layout.flatten(list(parts))

    def _parts(self, rows: Tensor) -> list[Tensor]:
        """Flat probes ``(k, dim)`` or ``(dim,)`` as per-parameter views."""
        return list(self.layout.unflatten(rows).values())

    def _build(self, theta: tuple[Tensor, ...], batch: Batch, weight: float) -> Any:
        raise NotImplementedError

    def _apply(
        self, theta: tuple[Tensor, ...], graphs: list[Any], rows: Tensor, batched: bool
    ) -> Tensor:
        raise NotImplementedError

    def _prepare_products(self) -> None:
        """Build what every product reuses (kept graphs here; subclass routes override)."""
        self._ensure_cache()

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

    def _apply_rows(
        self, theta: tuple[Tensor, ...], graphs: list[Any], rows: Tensor, batched: bool
    ) -> Tensor:
        if batched or rows.shape[0] == 1:
            return self._apply(theta, graphs, rows, batched)
        return torch.cat([self._apply(theta, graphs, r[None, :], False) for r in rows])

    def _products(self, rows: Tensor, batched: bool) -> Tensor:
        """Products for ``rows`` (``k x dim``, one probe per row), summed over batches/ranks."""
        self._ensure_cache()
        assert self._cache is not None
        theta, graphs = self._cache
        out: Tensor | None = None
        with module_mode(self.model, self.eval_mode), torch.enable_grad():
            if graphs:
                out = self._apply_rows(theta, graphs, rows, batched)
            rest = list(zip(self.data.batches, self._weights, strict=True))[len(graphs) :]
            for batch, w in rest:
                fresh = self._leaf()
                part = self._apply_rows(fresh, [self._build(fresh, batch, w)], rows, batched)
                out = part if out is None else out + part
        assert out is not None
        return self._reduce(out.detach())
