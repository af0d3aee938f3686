"""The loss along the straight line between two networks, and its barrier.

    θ(t) = θ_A + t (θ_B − θ_A),   t ∈ [0, 1]
    barrier = max_t [ L(θ(t)) − ((1 − t) L(θ_A) + t L(θ_B)) ]

(Frankle et al. 2020, "Linear mode connectivity and the lottery ticket hypothesis"; Entezari et
al. 2022 and Ainsworth et al. 2023 report it before and after permutation alignment.) A barrier
near zero says the two networks lie in one linearly connected basin. The path is written
``θ_A + t·Δ`` rather than ``(1−t)θ_A + tθ_B`` so that ``θ(0) = θ_A`` exactly and the path from a
network to itself is constant (barrier exactly 0).

The loss is evaluated with ``torch.func.functional_call`` through the shared
:class:`~lightning_curvature.curvature.functional.FunctionalLoss`, so the module is never written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_bool, check_int
from ..curvature.batches import as_batch_set
from ..curvature.functional import FunctionalLoss, LossFn, module_mode
from ..curvature.params import ParameterLayout

__all__ = ["PathLoss", "linear_path_loss"]


@dataclass(frozen=True)
class PathLoss:
    """The loss at evenly spaced points of the segment from θ_A to θ_B.

    Attributes
    ----------
    t : tuple of float
        Interpolation coefficients, ``0`` (A) to ``1`` (B).
    losses : tuple of float
        ``L(θ_A + t(θ_B − θ_A))`` on the measurement data.
    linear : tuple of float
        The chord ``(1 − t) L_A + t L_B``.
    barrier : float
        ``max_t (losses − linear)`` (0 at the endpoints, so never negative).
    barrier_t : float
        Where the maximum is attained.
    num_evaluations : int
        Loss evaluations over the whole data set (one per point).
    seconds : float
        Wall time.
    """

    t: tuple[float, ...]
    losses: tuple[float, ...]
    linear: tuple[float, ...]
    barrier: float
    barrier_t: float
    num_evaluations: int
    seconds: float


def _flat(layout: ParameterLayout, params: Mapping[str, Tensor], what: str) -> Tensor:
    missing = [n for n in layout.names if n not in params]
    if missing:
        raise ValueError(f"`{what}` lacks parameters {missing} of the model")
    return layout.flatten({n: params[n].detach() for n in layout.names})


def linear_path_loss(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    *,
    num_points: int = 25,
    eval_mode: bool = True,
) -> PathLoss:
    """Loss along the linear path from ``params_a`` to ``params_b`` and its barrier.

    Parameters
    ----------
    model : nn.Module
        Provides the architecture (and buffers); its parameters are not read or written.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar mean loss``.
    data : (inputs, targets) or iterable of batches or BatchSet
        The measurement set; the loss is its sample-weighted mean.
    params_a, params_b : dict of parameter name to Tensor
        Every trainable parameter of ``model`` (e.g. from :func:`parameter_dict`).
    num_points : int
        Points on ``[0, 1]`` including both ends (>= 3).
    eval_mode : bool
        Evaluate in eval mode (the model's mode is restored).
    """
    num_points = check_int("num_points", num_points, minimum=3)
    eval_mode = check_bool("eval_mode", eval_mode)
    start = time.perf_counter()
    layout = ParameterLayout.from_module(model)
    theta_a = _flat(layout, params_a, "params_a")
    theta_b = _flat(layout, params_b, "params_b").to(theta_a.device, theta_a.dtype)
    batches = as_batch_set(data, device=theta_a.device)
    loss = FunctionalLoss(model, loss_fn, layout)
    ts = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    delta = theta_b - theta_a
    values = []
    with module_mode(model, eval_mode), torch.no_grad():
        for t in ts.tolist():
            theta = theta_a if t == 0.0 else theta_a + t * delta
            values.append(float(loss.mean_loss(theta, batches)))
    la, lb = values[0], values[-1]
    linear = [(1.0 - t) * la + t * lb for t in ts.tolist()]
    gaps = [v - c for v, c in zip(values, linear, strict=True)]
    k = max(range(num_points), key=gaps.__getitem__)
    return PathLoss(
        t=tuple(ts.tolist()),
        losses=tuple(values),
        linear=tuple(linear),
        barrier=max(0.0, gaps[k]),
        barrier_t=float(ts[k]),
        num_evaluations=num_points,
        seconds=time.perf_counter() - start,
    )
