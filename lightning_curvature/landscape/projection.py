r"""What random 2-D projections see of the Hessian, and the HVP-free trace from their curvature.

For Gaussian directions :math:`\eta, \delta \sim \mathcal N(0, I_d)` the loss projected onto the
plane :math:`w^* + \alpha\eta + \beta\delta` has, at :math:`w^*`, the 2x2 Hessian

.. math:: P = \begin{pmatrix} \eta^\top H\eta & \eta^\top H\delta \\
                              \delta^\top H\eta & \delta^\top H\delta \end{pmatrix},

whose eigenvalues are the principal curvatures :math:`\kappa_\pm` of the projected surface.
Since :math:`E[\eta^\top H\eta] = \operatorname{tr} H` and :math:`E[\eta^\top H\delta] = 0`,
:math:`E[P] = \operatorname{tr}(H)\,I`: a random plane sees, on average, a bowl (or a dome) whose
curvature is the *trace*, so when positive eigenvalues dominate the trace a saddle looks like a
minimum (Böttcher & Wheeler 2024, §III).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_curvature.checks import ArgumentError, check_float, check_int
from lightning_curvature.curvature.functional import LossFn
from lightning_curvature.curvature.model_operator import ReduceFn
from lightning_curvature.curvature.operators import OperatorLike, as_operator
from lightning_curvature.curvature.params import ParameterLayout
from lightning_curvature.curvature.probes import as_generator

from .evaluation import evaluate_with_center

__all__ = [
    "ProjectionCurvatures",
    "ProjectionTrace",
    "projection_curvatures",
    "projection_trace_hvp_free",
]


@dataclass
class ProjectionCurvatures:
    r"""Principal curvatures of random 2-D projections of a Hessian.

    Attributes
    ----------
    kappa_plus, kappa_minus : ndarray
        ``(num_projections,)`` larger / smaller eigenvalue of each projected Hessian ``P``
        (Gaussian, un-normalized directions: entries :math:`\mathcal N(0, 1)`).
    matrices : ndarray
        ``(num_projections, 2, 2)`` the projected Hessians (off-diagonal symmetrized).
    saddle_fraction : float
        Share of projections with :math:`\kappa_- < 0 < \kappa_+` (indefinite ``P``: the
        projection shows a saddle).
    saddle_fraction_stderr : float
        Binomial standard error :math:`\sqrt{p(1-p)/n}`.
    trace_estimate : float
        Mean of :math:`(\kappa_+ + \kappa_-)/2`, unbiased for :math:`\operatorname{tr} H`.
    trace_stderr : float
        Standard error of that mean.
    mean_kappa_plus, mean_kappa_minus : float
        Ensemble average of the curvatures, :math:`\langle\kappa_\pm\rangle`.
    mean_matrix_kappa_plus, mean_matrix_kappa_minus : float
        Curvatures of the averaged matrix, :math:`\kappa_\pm(\langle P\rangle)`; both tend to
        :math:`\operatorname{tr} H` (since :math:`E[P] = \operatorname{tr}(H) I`), whereas
        :math:`\langle\kappa_\pm\rangle = \operatorname{tr} H \pm E|\ldots|` keeps the spread.
    num_projections, num_matvecs : int
    seconds : float
    """

    kappa_plus: np.ndarray
    kappa_minus: np.ndarray
    matrices: np.ndarray
    saddle_fraction: float
    saddle_fraction_stderr: float
    trace_estimate: float
    trace_stderr: float
    mean_kappa_plus: float
    mean_kappa_minus: float
    mean_matrix_kappa_plus: float
    mean_matrix_kappa_minus: float
    num_projections: int
    num_matvecs: int
    seconds: float


def _principal_curvatures(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[Any, Any]:
    """Eigenvalues of [[a, b], [b, c]] in closed form (larger, smaller)."""
    mid = (a + c) / 2
    radius = np.hypot((a - c) / 2, b)
    return mid + radius, mid - radius


def projection_curvatures(
    op: OperatorLike,
    num_projections: int,
    *,
    generator: torch.Generator | int | None = None,
    block_size: int = 16,
) -> ProjectionCurvatures:
    r"""Projected 2x2 Hessians of random Gaussian planes, their curvatures and saddle fraction.

    Draws ``num_projections`` pairs :math:`(\eta, \delta)` with i.i.d. :math:`\mathcal N(0,1)`
    entries, computes :math:`H\eta, H\delta` (2 HVPs per projection) and
    :math:`P = [[\eta^\top H\eta, \eta^\top H\delta], [\delta^\top H\eta, \delta^\top H\delta]]`.

    **Trace scaling.** For :math:`\eta \sim \mathcal N(0, I_d)`,
    :math:`E[\eta^\top H\eta] = \operatorname{tr}(H\,E[\eta\eta^\top]) = \operatorname{tr} H`, so
    :math:`(\kappa_+ + \kappa_-)/2 = \operatorname{tr}(P)/2 = (\eta^\top H\eta +
    \delta^\top H\delta)/2` is unbiased for :math:`\operatorname{tr} H` with no rescaling, with
    variance :math:`\operatorname{tr}(H^2)` (Gaussian quadratic forms have variance
    :math:`2\operatorname{tr}H^2`; two independent ones are averaged). For unit-norm directions
    :math:`\hat\eta = \eta/\lVert\eta\rVert` (uniform on the sphere,
    :math:`E[\hat\eta\hat\eta^\top] = I/d`) the curvatures are :math:`d` times smaller and the
    estimate must be multiplied by :math:`d`. Whether ``P`` is indefinite does not depend on the
    directions' lengths (``det P`` scales by a positive factor), so ``saddle_fraction`` is the
    same for either convention.

    Parameters
    ----------
    op : operator
        A :class:`~lightning_curvature.curvature.CurvatureOperator` (e.g. a ``HessianOperator``)
        or any object with ``dim`` and ``matvec(v)`` (optional ``matmat(V)``,
        ``dtype``/``device``, default float64 / cpu). Products come in blocks of
        ``2 * block_size`` columns.
    num_projections : int
        Number of random planes, ``>= 2``.
    generator : torch.Generator or int, optional
        Source of randomness or a seed (``None``: fresh seed; the global RNG is never used).
    block_size : int
        Projections whose HVPs go through one ``matmat`` call (``2 * block_size`` vectors).

    Returns
    -------
    ProjectionCurvatures

    References
    ----------
    L. Böttcher, G. Wheeler, "Visualizing high-dimensional loss landscapes with Hessian
    directions", J. Stat. Mech. (2024) 023401, §III (synthetic saddles: H = diag(+1 x 500,
    -1 x 500) shows its saddle in about 70% of random projections, H with 800 positive and 200
    negative unit eigenvalues essentially never).
    """
    check_int("num_projections", num_projections, minimum=2)
    check_int("block_size", block_size, minimum=1)
    op = as_operator(op)
    start = time.perf_counter()
    dim, dtype, device = op.dim, op.dtype, op.device
    generator = as_generator(generator)
    draw_device = generator.device
    rows: list[np.ndarray] = []
    num_matvecs = 0
    done = 0
    while done < num_projections:
        k = min(block_size, num_projections - done)
        # one vector per draw (eta_1, delta_1, eta_2, ...): torch's block-wise Box-Muller would
        # otherwise make the numbers depend on block_size
        z = torch.stack(
            [
                torch.randn(dim, generator=generator, device=draw_device, dtype=dtype)
                for _ in range(2 * k)
            ]
        ).to(device)
        hz = op.matmat(z.T).T  # (2k, dim)
        num_matvecs += 2 * k
        eta, delta = z[0::2], z[1::2]
        h_eta, h_delta = hz[0::2], hz[1::2]
        a = (eta * h_eta).sum(dim=1)
        c = (delta * h_delta).sum(dim=1)
        b = ((eta * h_delta).sum(dim=1) + (delta * h_eta).sum(dim=1)) / 2
        rows.append(torch.stack([a, b, c], dim=1).double().cpu().numpy())
        done += k
    abc = np.concatenate(rows)
    a, b, c = abc[:, 0], abc[:, 1], abc[:, 2]
    kappa_plus, kappa_minus = _principal_curvatures(a, b, c)
    saddle = (kappa_plus > 0) & (kappa_minus < 0)
    p = float(saddle.mean())
    half_trace = (kappa_plus + kappa_minus) / 2
    ma, mb, mc = a.mean(), b.mean(), c.mean()
    mk_plus, mk_minus = _principal_curvatures(ma, mb, mc)
    matrices = np.stack([np.stack([a, b], 1), np.stack([b, c], 1)], 1)
    n = num_projections
    return ProjectionCurvatures(
        kappa_plus=kappa_plus,
        kappa_minus=kappa_minus,
        matrices=matrices,
        saddle_fraction=p,
        saddle_fraction_stderr=math.sqrt(p * (1 - p) / n),
        trace_estimate=float(half_trace.mean()),
        trace_stderr=float(half_trace.std(ddof=1) / math.sqrt(n)),
        mean_kappa_plus=float(kappa_plus.mean()),
        mean_kappa_minus=float(kappa_minus.mean()),
        mean_matrix_kappa_plus=float(mk_plus),
        mean_matrix_kappa_minus=float(mk_minus),
        num_projections=n,
        num_matvecs=num_matvecs,
        seconds=time.perf_counter() - start,
    )


@dataclass
class ProjectionTrace:
    r"""HVP-free trace estimate from the curvature of the loss along random directions.

    Attributes
    ----------
    value : float
        :math:`d \cdot \operatorname{mean}_j \kappa_j`, estimate of :math:`\operatorname{tr} H`.
    stderr : float
        :math:`d \cdot \operatorname{std}_j(\kappa_j)/\sqrt{n}`.
    curvatures : ndarray
        :math:`\kappa_j = 2c_j \approx u_j^\top H u_j` per unit direction :math:`u_j`.
    fit_rmse : ndarray
        Root-mean-square residual of each quadratic fit; large values next to
        :math:`|c_j|\,r^2` mean the radius is too large for a quadratic model.
    radius : float
    num_points, num_directions, dim, num_forward : int
    seconds : float
    """

    value: float
    stderr: float
    curvatures: np.ndarray
    fit_rmse: np.ndarray
    radius: float
    num_points: int
    num_directions: int
    dim: int
    num_forward: int
    seconds: float


def projection_trace_hvp_free(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    num_directions: int,
    *,
    radius: float,
    num_points: int = 5,
    generator: torch.Generator | int | None = None,
    eval_mode: bool | None = True,
    reduce_fn: ReduceFn | None = None,
    params: object = None,
    chunk_size: int | None = None,
    memory_budget: int = 1 << 30,
) -> ProjectionTrace:
    r"""Trace of the Hessian from quadratic fits of the loss along random unit directions.

    For each of ``num_directions`` directions :math:`u_j` (Gaussian, normalized to unit length,
    hence uniform on the sphere) the loss is evaluated at ``num_points`` step sizes
    :math:`\alpha` evenly spaced on :math:`[-r, r]` and fitted by least squares with
    :math:`a + b\alpha + c\alpha^2`. Then :math:`2c_j \approx u_j^\top H u_j`, and since
    :math:`E[u u^\top] = I/d`,

    .. math:: \widehat{\operatorname{tr} H} = \frac{d}{n}\sum_j 2c_j ,\qquad
              \mathrm{stderr} = d\,\frac{\operatorname{std}_j(2c_j)}{\sqrt n}.

    Only forward passes are needed (no HVPs, no backward).

    .. warning::
       The result depends on ``radius`` (a Euclidean distance in parameter space). Too large
       and the quartic and higher even terms of the loss bias :math:`c` (on a symmetric grid the
       odd terms, including the gradient, drop out of :math:`c`); ReLU kinks inside the radius
       are averaged into a "curvature" that is not the Hessian's. Too small and the loss
       differences :math:`c\,r^2` drown in floating-point rounding of the loss (about
       :math:`10^{-7} L` in float32). Check that the estimate is stable when ``radius`` is
       halved, and look at ``fit_rmse``.

    Parameters
    ----------
    model, loss_fn, data :
        As :func:`loss_surface`.
    num_directions : int
        Random directions, ``>= 2``.
    radius : float
        Largest step, ``> 0``, in parameter-space distance.
    num_points : int
        Step sizes per direction, odd and ``>= 3`` (the centre is evaluated once, shared).
    generator : torch.Generator or int, optional
        Source of randomness or a seed (``None``: fresh seed; the global RNG is never used).
    eval_mode, reduce_fn, params, chunk_size, memory_budget :
        As :func:`loss_surface`.

    Returns
    -------
    ProjectionTrace

    References
    ----------
    L. Böttcher, G. Wheeler, "Visualizing high-dimensional loss landscapes with Hessian
    directions", J. Stat. Mech. (2024) 023401, §III (trace from projection curvature).
    """
    check_int("num_directions", num_directions, minimum=2)
    check_float("radius", radius, low=0.0, low_open=True)
    check_int("num_points", num_points, minimum=3)
    if num_points % 2 == 0:
        raise ArgumentError(f"`num_points` must be an odd integer >= 3, got {num_points!r}")
    start = time.perf_counter()
    layout = ParameterLayout.from_module(model, params)  # type: ignore[arg-type]
    ref = layout.parameters(model)[0]
    generator = as_generator(generator)
    draw_device = generator.device
    z = torch.randn(
        num_directions, layout.dim, generator=generator, device=draw_device, dtype=ref.dtype
    ).to(ref.device)
    units = z / torch.linalg.vector_norm(z, dim=1, keepdim=True)
    alphas = np.linspace(-radius, radius, num_points)
    alphas[num_points // 2] = 0.0
    nonzero = np.delete(alphas, num_points // 2)
    m = len(nonzero)
    coefficients = np.zeros((num_directions * m, num_directions))
    for j in range(num_directions):
        coefficients[j * m : (j + 1) * m, j] = nonzero
    result, center = evaluate_with_center(
        model,
        loss_fn,
        data,
        units,
        torch.from_numpy(coefficients),
        params=params,
        eval_mode=eval_mode,
        reduce_fn=reduce_fn,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
    )
    losses = result.losses.numpy()
    design = np.stack([np.ones_like(alphas), alphas, alphas**2], axis=1)
    curvatures = np.empty(num_directions)
    rmse = np.empty(num_directions)
    for j in range(num_directions):
        values = np.insert(losses[j * m : (j + 1) * m], num_points // 2, center)
        coef, *_ = np.linalg.lstsq(design, values, rcond=None)
        curvatures[j] = 2 * coef[2]
        rmse[j] = float(np.sqrt(np.mean((design @ coef - values) ** 2)))
    d = layout.dim
    return ProjectionTrace(
        value=float(d * curvatures.mean()),
        stderr=float(d * curvatures.std(ddof=1) / math.sqrt(num_directions)),
        curvatures=curvatures,
        fit_rmse=rmse,
        radius=float(radius),
        num_points=num_points,
        num_directions=num_directions,
        dim=d,
        num_forward=result.num_forward,
        seconds=time.perf_counter() - start,
    )
