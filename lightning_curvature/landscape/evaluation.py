"""Many losses at once: L(w* + c_p · B) for a list of coefficient rows c_p and a basis B.

Both the loss surfaces and the HVP-free projection trace evaluate the model at a few hundred
points of a low-dimensional affine subspace. This module does that with ``functional_call``
(the module is never written), in ``torch.no_grad``, with the data gathered once, and the points
processed in chunks: each chunk of points is stacked into a ``(C, dim)`` parameter tensor and
``torch.func.vmap`` evaluates them in one call, or, where that is not faster, one point at a time.

Why both: on a GPU a small model is launch-bound and vmap over points is much faster; on a CPU a
forward pass over a few thousand samples is already a large GEMM and vmap's batched matmuls were
measured *slower* than a plain loop (1.2-2x the bare-forward floor vs about 1.1x, the loss
included, on the MLP 784-128-10 with 2,048 samples). With ``vectorize=None`` the choice is fixed
by the device (vmap off the CPU, the loop on it), so the numbers never depend on timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from lightning_curvature.curvature.batches import BatchSet, as_batch_set
from lightning_curvature.curvature.functional import FunctionalLoss, module_mode
from lightning_curvature.curvature.params import ParameterLayout

__all__ = ["PointEvaluation", "evaluate_points"]

ReduceFn = Callable[[Tensor], Tensor]


@dataclass
class PointEvaluation:
    """Losses at a list of points and what they cost.

    Attributes
    ----------
    losses : Tensor
        ``(P,)`` sample-weighted mean loss at each point (float64, on the CPU).
    num_forward : int
        Forward passes run by this process (points x batches).
    chunk_size : int
        Points per vectorized call (1 when evaluated one by one).
    vectorized : bool
        Whether ``vmap`` was used for the bulk of the points.
    seconds : float
        Wall time.
    """

    losses: Tensor
    num_forward: int
    chunk_size: int
    vectorized: bool
    seconds: float


class _OutputBytes(TorchFunctionMode):
    """Adds up the bytes of every tensor produced while active (an activation-memory bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.total += t.numel() * t.element_size()
        return out


def _bytes_per_point(functional: FunctionalLoss, center: Tensor, data: BatchSet) -> int:
    """Parameters plus (an upper bound of) activations of one point on the largest batch."""
    _, batch = max(zip(data.sizes, data.batches, strict=True), key=lambda sb: sb[0])
    probe = _OutputBytes()
    with probe:
        functional(center, batch)
    return center.numel() * center.element_size() + probe.total


def evaluate_points(
    model: nn.Module,
    loss_fn: Callable[[object, object], Tensor],
    data: object,
    basis: Tensor,
    coefficients: Tensor,
    *,
    params: object = None,
    eval_mode: bool | None = True,
    reduce_fn: ReduceFn | None = None,
    chunk_size: int | None = None,
    memory_budget: int = 1 << 30,
    vectorize: bool | None = None,
) -> PointEvaluation:
    r"""Loss at :math:`w^* + \sum_k c_{pk} b_k` for every row ``c_p`` of ``coefficients``.

    Parameters
    ----------
    model : nn.Module
        Defines :math:`w^*` (its current trainable parameters) and the forward pass; never
        modified (``functional_call``; mode restored).
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar mean loss``.
    data : (inputs, targets), iterable of batches, DataLoader or BatchSet
        The measurement set; the loss is its sample-weighted mean whatever the batch split.
    basis : Tensor
        ``(K, dim)`` directions in ``ParameterLayout`` order.
    coefficients : Tensor
        ``(P, K)`` coordinates of the points.
    params : optional
        Parameter subset (as ``ParameterLayout.from_module``).
    eval_mode : bool or None
        Mode during evaluation (``None`` = leave as is); restored afterwards.
    reduce_fn : callable, optional
        Sums a tensor over DDP ranks. Each rank passes its shard; every rank gets the global
        mean: ``reduce_fn(sum_b n_b L_b / reduce_fn(N_local))``.
    chunk_size : int, optional
        Points per vectorized call. Default: as many as fit in ``memory_budget``.
    memory_budget : int
        Bytes one chunk may use (stacked parameters + an upper bound of the activations,
        measured on a probe forward pass).
    vectorize : bool, optional
        ``True``: vmap over chunks; ``False``: one point at a time; ``None``: vmap on
        accelerators, the loop on CPU (a model vmap cannot handle falls back to the loop).
    """
    start = time.perf_counter()
    layout = ParameterLayout.from_module(model, params)  # type: ignore[arg-type]
    center = layout.flat_values(model)
    if basis.dim() != 2 or basis.shape[1] != layout.dim:
        raise ValueError(
            f"directions must be vectors of length {layout.dim} (the model's trainable "
            f"parameters), got a basis of shape {tuple(basis.shape)}"
        )
    if coefficients.dim() != 2 or coefficients.shape[1] != basis.shape[0]:
        raise ValueError(
            f"coefficients must be (P, {basis.shape[0]}), got {tuple(coefficients.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if eval_mode not in (True, False, None):
        raise ValueError(f"eval_mode must be True, False or None, got {eval_mode!r}")
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    basis = basis.to(device=center.device, dtype=center.dtype)
    coefficients = coefficients.to(device=center.device, dtype=center.dtype)
    batches = as_batch_set(data, device=center.device, dtype=center.dtype)
    functional = FunctionalLoss(model, loss_fn, layout)
    num_points = coefficients.shape[0]

    if reduce_fn is None:
        weights = batches.weights
    else:
        global_n = reduce_fn(
            torch.tensor(float(batches.num_samples), dtype=torch.float64, device=center.device)
        )
        weights = [n / float(global_n) for n in batches.sizes]
    weighted = list(zip(batches.batches, weights, strict=True))

    def points_of(lo: int, hi: int) -> Tensor:
        return torch.addmm(center.expand(hi - lo, -1), coefficients[lo:hi], basis)

    def run_loop(lo: int, hi: int) -> Tensor:
        thetas = points_of(lo, hi)
        out = torch.zeros(hi - lo, dtype=torch.float64, device=center.device)
        for p in range(hi - lo):
            for batch, w in weighted:
                out[p] += functional(thetas[p], batch).double() * w
        return out

    def run_vmap(lo: int, hi: int) -> Tensor:
        thetas = points_of(lo, hi)
        out = torch.zeros(hi - lo, dtype=torch.float64, device=center.device)
        for batch, w in weighted:
            out += vmap(lambda th, b=batch: functional(th, b))(thetas).double() * w
        return out

    losses = torch.empty(num_points, dtype=torch.float64, device=center.device)
    cuda = [center.device.index or 0] if center.device.type == "cuda" else []
    # fork_rng: a model evaluated in train mode with dropout must not advance the global RNG
    with torch.no_grad(), torch.random.fork_rng(devices=cuda), module_mode(model, eval_mode):
        if chunk_size is None and vectorize is False:
            chunk_size = 1
        if chunk_size is None:
            per_point = _bytes_per_point(functional, center, batches)
            chunk_size = max(1, min(num_points, memory_budget // max(per_point, 1)))
        lo = 0
        if vectorize is None:
            # A fixed rule, not a timing race: results must not depend on machine load (the
            # paths agree only to float rounding). vmap on accelerators, where small models are
            # launch-bound; the plain loop on CPU, where vmap measured slower (module docstring).
            vectorized = chunk_size > 1 and center.device.type != "cpu"
            if vectorized:
                try:
                    lo = min(num_points, chunk_size)
                    losses[:lo] = run_vmap(0, lo)
                except RuntimeError:
                    # e.g. in-place buffer updates (BatchNorm in train mode): loop instead
                    vectorized, lo = False, 0
        else:
            vectorized = vectorize
        while lo < num_points:
            hi = min(num_points, lo + (chunk_size if vectorized else 1))
            losses[lo:hi] = (run_vmap if vectorized else run_loop)(lo, hi)
            lo = hi
    if reduce_fn is not None:
        losses = reduce_fn(losses)
    return PointEvaluation(
        losses=losses.cpu(),
        num_forward=num_points * len(weighted),
        chunk_size=chunk_size if vectorized else 1,
        vectorized=vectorized,
        seconds=time.perf_counter() - start,
    )
