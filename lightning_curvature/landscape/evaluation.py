"""Many losses at once: L(w* + c_p · B) for a list of coefficient rows c_p and a basis B.

Both the loss surfaces and the HVP-free projection trace evaluate the model at a few hundred
points of a low-dimensional affine subspace. This module does that with ``functional_call``
(the module is never written), in ``torch.no_grad``, with the data gathered once, and the points
processed in chunks: each chunk of points is stacked into a ``(C, dim)`` parameter tensor and
``torch.func.vmap`` evaluates them in one call, or, where that is not faster, one point at a time.

Where the model allows it, the first layer is not run per point at all: for an ``nn.Sequential``
whose first parametrized layer is a Linear or convolution fed by the data, that layer's output
on the subspace is ``Z_0 + Σ_k c_k Z_k`` with K + 1 outputs computed once
(:mod:`~lightning_curvature.landscape.stem`), and only the rest of the network runs per point,
by either of the two routes below. ``linear_stem=False`` turns this off.

Why both routes: on a GPU a small model is launch-bound and vmap over points is much faster; on
a CPU a forward pass over a few thousand samples is already a large GEMM and vmap's batched
matmuls were measured *slower* than a plain loop (1.2-2x the bare-forward floor vs about 1.1x,
the loss included, on the MLP 784-128-10 with 2,048 samples, without the linear stem). With
``vectorize=None`` the choice is fixed by the device (vmap off the CPU, the loop on it), so the
numbers never depend on timing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from lightning_curvature.checks import check_bool, check_int
from lightning_curvature.curvature.batches import BatchSet, as_batch_set
from lightning_curvature.curvature.functional import FunctionalLoss, LossFn, module_mode
from lightning_curvature.curvature.model_operator import ReduceFn
from lightning_curvature.curvature.params import ParameterLayout

from .stem import MIN_FAN_IN_PER_TERM, LinearStem, find_linear_stem

__all__ = ["PointEvaluation", "evaluate_points", "evaluate_with_center"]


@dataclass(frozen=True)
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
    linear_stem : bool
        Whether the first layer was evaluated once per direction (module docstring).
    """

    losses: Tensor
    num_forward: int
    chunk_size: int
    vectorized: bool
    seconds: float
    linear_stem: bool = False


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


class _DirectPoints:
    """The generic route: the whole forward pass at every point (``functional_call``)."""

    linear_stem = False

    def __init__(
        self,
        functional: FunctionalLoss,
        center: Tensor,
        basis: Tensor,
        coefficients: Tensor,
        weighted: list[tuple[object, float]],
    ) -> None:
        self.functional, self.center, self.basis = functional, center, basis
        self.coefficients, self.weighted = coefficients, weighted

    def _thetas(self, lo: int, hi: int) -> Tensor:
        return torch.addmm(self.center.expand(hi - lo, -1), self.coefficients[lo:hi], self.basis)

    def loop(self, lo: int, hi: int) -> Tensor:
        thetas = self._thetas(lo, hi)
        out = torch.zeros(hi - lo, dtype=torch.float64, device=self.center.device)
        for p in range(hi - lo):
            for batch, w in self.weighted:
                out[p] += self.functional(thetas[p], batch).double() * w
        return out

    def vmap(self, lo: int, hi: int) -> Tensor:
        thetas = self._thetas(lo, hi)
        out = torch.zeros(hi - lo, dtype=torch.float64, device=self.center.device)
        for batch, w in self.weighted:
            out += vmap(lambda th, b=batch: self.functional(th, b))(thetas).double() * w
        return out


class _StemPoints:
    """The first layer combined from K + 1 precomputed outputs; the tail runs per point.

    Only the tail's parameters are assembled per point (for the MLP 784-128-10, 1,290 of
    101,770 numbers), and the first layer costs one ``(K+1)``-term combination per point.
    """

    linear_stem = True

    def __init__(
        self,
        stem: LinearStem,
        model: nn.Module,
        functional: FunctionalLoss,
        center: Tensor,
        basis: Tensor,
        coefficients: Tensor,
        weighted: list[tuple[object, float]],
    ) -> None:
        self.stem, self.model, self.functional = stem, model, functional
        layout = functional.layout
        prefix = stem.layer_prefix
        self.tail = [
            (n, o, k, shape)
            for n, o, k, shape in zip(
                layout.names, layout.offsets, layout.numels, layout.shapes, strict=True
            )
            if not n.startswith(prefix)
        ]
        cols = [torch.arange(o, o + k, device=center.device) for _, o, k, _ in self.tail]
        idx = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long, device=center.device)
        self.center, self.basis = center[idx], basis[:, idx]
        ones = torch.ones(coefficients.shape[0], 1, dtype=center.dtype, device=center.device)
        self.mix = torch.cat([ones, coefficients], dim=1)  # (P, K + 1): Z_0 + Σ c_k Z_k
        # The loop combines only the nonzero terms of each point: a point of the projection
        # trace lies on one of K directions, a grid point on two.
        mix_cpu = self.mix.detach().cpu().double().numpy()
        self.terms = [[(int(k), float(row[k])) for k in np.flatnonzero(row)] for row in mix_cpu]
        self.device = center.device
        self.batches = []
        for (inputs, targets), w in weighted:  # type: ignore[misc]
            z = stem.outputs(model, functional, center, basis, inputs)
            self.batches.append((z.reshape(z.shape[0], -1), z.shape[1:], targets, w))

    def _tensors(self, theta_tail: Tensor) -> dict[str, Tensor]:
        own = {}
        start = 0
        for n, _, k, shape in self.tail:
            own[n] = theta_tail[..., start : start + k].reshape(*theta_tail.shape[:-1], *shape)
            start += k
        return {**self.functional.fixed_tensors(), **own}

    def _loss(self, theta_tail: Tensor, hidden: Tensor, targets: object) -> Tensor:
        out = self.stem.tail_outputs(self.model, self._tensors(theta_tail), hidden)
        return self.functional.loss_fn(out, targets)

    def _thetas(self, lo: int, hi: int) -> Tensor:
        return torch.addmm(self.center.expand(hi - lo, -1), self.mix[lo:hi, 1:], self.basis)

    def loop(self, lo: int, hi: int) -> Tensor:
        thetas = self._thetas(lo, hi)
        out = torch.zeros(hi - lo, dtype=torch.float64, device=self.device)
        for p in range(hi - lo):
            for z, shape, targets, w in self.batches:
                hidden = _combine(z, self.terms[lo + p]).reshape(shape)
                out[p] += self._loss(thetas[p], hidden, targets).double() * w
        return out

    def vmap(self, lo: int, hi: int) -> Tensor:
        thetas = self._thetas(lo, hi)
        out = torch.zeros(hi - lo, dtype=torch.float64, device=self.device)
        for z, shape, targets, w in self.batches:
            hidden = (self.mix[lo:hi] @ z).reshape(hi - lo, *shape)
            out += vmap(lambda th, h, y=targets: self._loss(th, h, y))(thetas, hidden).double() * w
        return out


def _combine(z: Tensor, terms: list[tuple[int, float]]) -> Tensor:
    """Σ_k c_k z_k over the nonzero terms (the first is Z_0 with c = 1: exact at w*)."""
    (k0, c0), rest = terms[0], terms[1:]
    if not rest:
        return z[k0] * c0 if c0 != 1.0 else z[k0].clone()
    (k1, c1), rest = rest[0], rest[1:]
    out = torch.add(z[k0], z[k1], alpha=c1) if c0 == 1.0 else z[k0] * c0 + z[k1] * c1
    for k, c in rest:
        out.add_(z[k], alpha=c)
    return out


def _stem_bytes(functional: FunctionalLoss, center: Tensor, batches: BatchSet, k: int) -> int:
    """Bytes of the K + 1 first-layer outputs of every batch (they are kept for the whole grid)."""
    total = 0
    for _, batch in zip(batches.sizes, batches.batches, strict=True):
        probe = _OutputBytes()
        with probe:
            functional(center, batch)
        total += probe.total
    return (k + 1) * total  # the whole forward's outputs bound the first layer's


def evaluate_points(
    model: nn.Module,
    loss_fn: LossFn,
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
    linear_stem: bool | None = None,
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
        measured on a probe forward pass); the first-layer outputs of the linear stem must fit
        in it too.
    vectorize : bool, optional
        ``True``: vmap over chunks; ``False``: one point at a time; ``None``: vmap on
        accelerators, the loop on CPU (a model vmap cannot handle falls back to the loop).
    linear_stem : bool, optional
        Evaluate a Linear/conv first layer once per direction (module docstring). ``None``
        (default): wherever the model allows it, the layer's fan-in is at least
        ``MIN_FAN_IN_PER_TERM`` times the terms of the per-point combination (1 + the most
        nonzero coordinates of a point) and the K + 1 outputs fit in ``memory_budget``;
        ``False``: never; ``True``: required (``ValueError`` if the model does not allow it).
    """
    start = time.perf_counter()
    check_int("chunk_size", chunk_size, minimum=1, allow_none=True)
    check_int("memory_budget", memory_budget, minimum=1)
    check_bool("eval_mode", eval_mode, allow_none=True)
    check_bool("vectorize", vectorize, allow_none=True)
    check_bool("linear_stem", linear_stem, allow_none=True)
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
    basis = basis.to(device=center.device, dtype=center.dtype)
    coefficients = coefficients.to(device=center.device, dtype=center.dtype)
    batches = as_batch_set(data, device=center.device, dtype=center.dtype)
    functional = FunctionalLoss(model, loss_fn, layout)
    num_points = coefficients.shape[0]
    weighted = list(zip(batches.batches, _weights(batches, reduce_fn, center.device), strict=True))

    losses = torch.empty(num_points, dtype=torch.float64, device=center.device)
    cuda = [center.device.index or 0] if center.device.type == "cuda" else []
    # fork_rng: a model evaluated in train mode with dropout must not advance the global RNG
    with torch.no_grad(), torch.random.fork_rng(devices=cuda), module_mode(model, eval_mode):
        if chunk_size is None and vectorize is False:
            chunk_size = 1
        if chunk_size is None:
            per_point = _bytes_per_point(functional, center, batches)
            chunk_size = max(1, min(num_points, memory_budget // max(per_point, 1)))
        stem = _choose_stem(
            model, functional, center, batches, basis, coefficients, linear_stem, memory_budget
        )
        points: _DirectPoints | _StemPoints
        if stem is None:
            points = _DirectPoints(functional, center, basis, coefficients, weighted)
        else:
            points = _StemPoints(stem, model, functional, center, basis, coefficients, weighted)
        vectorized = _run_chunks(points, losses, num_points, chunk_size, vectorize, center.device)
    if reduce_fn is not None:
        losses = reduce_fn(losses)
    return PointEvaluation(
        losses=losses.cpu(),
        num_forward=num_points * len(weighted),
        chunk_size=chunk_size if vectorized else 1,
        vectorized=vectorized,
        seconds=time.perf_counter() - start,
        linear_stem=points.linear_stem,
    )


def _weights(batches: BatchSet, reduce_fn: ReduceFn | None, device: torch.device) -> list[float]:
    """Per-batch weights n_b / N, with N summed over DDP ranks when ``reduce_fn`` is given."""
    if reduce_fn is None:
        return batches.weights
    global_n = reduce_fn(
        torch.tensor(float(batches.num_samples), dtype=torch.float64, device=device)
    )
    return [n / float(global_n) for n in batches.sizes]


def _choose_stem(
    model: nn.Module,
    functional: FunctionalLoss,
    center: Tensor,
    batches: BatchSet,
    basis: Tensor,
    coefficients: Tensor,
    linear_stem: bool | None,
    memory_budget: int,
) -> LinearStem | None:
    if linear_stem is False:
        return None
    stem = find_linear_stem(model, batches.batches)
    if stem is None:
        if linear_stem:
            raise ValueError(
                "linear_stem=True: the model is not an nn.Sequential whose first parametrized "
                "layer is a Linear/Conv fed by tensor inputs (see landscape.stem)"
            )
        return None
    if linear_stem is None:
        # Terms of the per-point combination: Z_0 plus the nonzero coordinates of a point.
        terms = 1 + int((coefficients != 0).sum(dim=1).max()) if len(coefficients) else 1
        if stem.fan_in(model) < MIN_FAN_IN_PER_TERM * terms:
            return None  # the combination would cost more than the layer (landscape.stem)
        if _stem_bytes(functional, center, batches, basis.shape[0]) > memory_budget:
            return None
    return stem


def _run_chunks(
    points: _DirectPoints | _StemPoints,
    losses: Tensor,
    num_points: int,
    chunk_size: int,
    vectorize: bool | None,
    device: torch.device,
) -> bool:
    """Fill ``losses`` chunk by chunk; returns whether vmap was used."""
    lo = 0
    if vectorize is None:
        # A fixed rule, not a timing race: results must not depend on machine load (the paths
        # agree only to float rounding). vmap on accelerators, where small models are
        # launch-bound; the plain loop on CPU, where vmap measured slower (module docstring).
        vectorized = chunk_size > 1 and device.type != "cpu"
        if vectorized:
            try:
                lo = min(num_points, chunk_size)
                losses[:lo] = points.vmap(0, lo)
            except RuntimeError:
                # e.g. in-place buffer updates (BatchNorm in train mode): loop instead
                vectorized, lo = False, 0
    else:
        vectorized = vectorize
    while lo < num_points:
        hi = min(num_points, lo + (chunk_size if vectorized else 1))
        losses[lo:hi] = points.vmap(lo, hi) if vectorized else points.loop(lo, hi)
        lo = hi
    return vectorized


def evaluate_with_center(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    basis: Tensor,
    coefficients: Tensor,
    *,
    center_index: int | None = None,
    **options: object,
) -> tuple[PointEvaluation, float]:
    """:func:`evaluate_points` plus L(w*): the row ``center_index`` if w* is on the list, else
    one appended zero row (dropped from the returned losses).

    The loss surfaces and the HVP-free projection trace both need the losses at their points
    and at w* from the same evaluation (so the centre carries the same rounding as the grid).
    ``options`` are :func:`evaluate_points`' keywords.
    """
    if center_index is None:
        zero = torch.zeros(1, coefficients.shape[1], dtype=coefficients.dtype)
        coefficients = torch.cat([coefficients, zero.to(coefficients.device)])
    result = evaluate_points(model, loss_fn, data, basis, coefficients, **options)  # type: ignore[arg-type]
    losses = result.losses
    if center_index is None:
        center, losses = float(losses[-1]), losses[:-1]
    else:
        center = float(losses[center_index])
    return replace(result, losses=losses), center
