r"""Online natural-gradient SGD (Kaldi's NG-SGD), the optimizer seed 002 trained with.

For every parameter tensor and every axis ``a`` of size ``D > 1`` an online Fisher factor
``F_t^{(a)}`` (D×D, low rank + ρI, :mod:`.online_factor`) is kept. A step preconditions the
gradient along each axis in turn (axis 0 first): the tensor is viewed with axis ``a`` last and
the other axes flattened into rows, ``X`` (N×D, N = numel/D), and replaced by

    X̂ = β_t X (F_t + κ_t I)⁻¹ · ‖X‖_F / ‖β_t X (F_t + κ_t I)⁻¹‖_F,    κ_t = α·tr(F_t)/D,

so every preconditioned gradient keeps the Frobenius norm of the raw one and only its direction
changes. The factor is then updated online from the same rows (forgetting η, every
``update_period`` steps, every step for the first ten). The step itself is heavy-ball SGD on the
preconditioned direction ``Δ``, with coupled L2 weight decay added to the gradient first (as in
the reference port)::

    g ← ∇L + wd·θ,    Δ = P(g),    m ← μ m + Δ  (m₀ = Δ),    θ ← θ − lr·m.

κ here is the seed paper's ``κ = α·max(tr F, ε)/d`` read the way the algorithm defines it: ``d``
is the size D of one axis of one tensor, tr F the trace of that axis' factor, and ε the floor of
the factor's eigenvalues (and its initial value).

Under DDP the optimizer reads ``.grad`` after the all-reduce, so every rank preconditions the
same gradient with the same (deterministically initialized) factors and holds the same state.

References
----------
Povey, Zhang & Khudanpur (2015), "Parallel training of DNNs with natural gradient and parameter
averaging", arXiv:1410.7455 (section 3, appendix C); Kaldi ``src/nnet3/natural-gradient-online.h``;
the PyTorch port ``NGD-SGD`` (Y. Shao), whose per-axis treatment of a tensor this follows.
Wei et al. (2024), seed 002 of this project (NGD "as in Yao et al. 2020", i.e. this method).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ..checks import check_float, check_int
from .online_factor import FactorSettings, default_rank, init_factor, precondition_rows, smoothing

__all__ = ["OnlineNGD"]


def _check_group(group: dict) -> None:
    group["lr"] = check_float("lr", group["lr"], low=0.0, low_open=True)
    group["alpha"] = check_float("alpha", group["alpha"], low=0.0, low_open=True)
    group["eps"] = check_float("eps", group["eps"], low=0.0, low_open=True)
    unit = {"low": 0.0, "high": 1.0, "high_open": True}
    group["eta"] = check_float("eta", group["eta"], low_open=True, **unit)
    group["momentum"] = check_float("momentum", group["momentum"], **unit)
    group["weight_decay"] = check_float("weight_decay", group["weight_decay"], low=0.0)
    group["rank"] = check_int("rank", group["rank"], minimum=1)
    group["update_period"] = check_int("update_period", group["update_period"], minimum=1)


def _settings(group: dict) -> FactorSettings:
    return FactorSettings(
        alpha=group["alpha"],
        eps=group["eps"],
        eta=group["eta"],
        update_period=group["update_period"],
    )


def _new_factors(p: Tensor, max_rank: int, settings: FactorSettings) -> dict[int, dict]:
    """One factor per axis of size > 1 (axes of size 1 and 0-d tensors need none)."""
    return {
        axis: init_factor(dim, default_rank(dim, max_rank), settings, p)
        for axis, dim in enumerate(p.shape)
        if dim > 1
    }


def precondition(grad: Tensor, factors: dict[int, dict], settings: FactorSettings) -> Tensor:
    """Apply (and update) each axis' factor in turn; see the module docstring."""
    x = grad
    for axis, state in factors.items():
        moved = x.transpose(-1, axis)  # this axis last, the others become rows
        rows = moved.reshape(-1, moved.shape[-1])  # a view for 2-D tensors (no copy)
        x = precondition_rows(state, rows, settings).view(moved.shape).transpose(-1, axis)
    return x


class OnlineNGD(torch.optim.Optimizer):
    r"""Kaldi's online natural-gradient SGD over any parameters (no hooks, no model needed).

    Parameters
    ----------
    params : iterable of Tensor or dict
        Parameters or parameter groups (each group may set any hyperparameter below).
    lr : float
        Learning rate > 0.
    alpha : float
        Smoothing α > 0 of each factor, ``κ = α·tr(F)/D``. The algorithm's own default is 4
        (strong smoothing); seed 002 used 1e-1 … 1e-3. Large α → the SGD direction.
    eps : float
        Floor ε > 0 of every factor's eigenvalues (d and ρ), also their initial value. Kaldi fixes
        it at 1e-10.
    rank : int
        Largest rank of a factor's low-rank part: an axis of size D gets
        ``R = min((D + 1)//2, rank)`` (Kaldi's ``min((D + 1)//2, 80)`` with the default 80).
    update_period : int
        Update the factors every ``update_period`` steps (every step for the first ten).
    eta : float
        Forgetting factor η ∈ (0, 1): ``F ← η XᵀX/N + (1 − η) F``.
    momentum : float
        Heavy-ball momentum μ ∈ [0, 1) on the preconditioned direction (as ``torch.optim.SGD``).
    weight_decay : float
        L2 coefficient ≥ 0, added to the gradient *before* preconditioning (as the port does).

    Attributes
    ----------
    stats : dict
        After each step: ``kappa`` and ``fisher_trace``, the means over all factors of
        ``κ = α·tr(F)/D`` and ``tr F`` of the factors as they stand after the step;
        ``update_norm`` (‖θ_{t+1} − θ_t‖ over all parameters); ``num_factors``; ``restarts``
        (factors reset this step because their output was not finite; their gradient was
        passed through unpreconditioned).

    Notes
    -----
    Rows are the other axes of the gradient itself, so a bias (1-D) is preconditioned with N = 1
    row per step, a Linear weight (out, in) by an in-factor over its ``out`` rows and an
    out-factor over its ``in`` rows, a Conv2d weight by four factors. State lives on the
    parameter's device and dtype; the R×R eigendecomposition of each update runs on the CPU.

    *Agreement with the references.* The recursion, its schedule and its initialization are those
    of the PyTorch port that seed 002 used; from the same weights and batches the trajectories
    agree with it to ~1e-11 (LeNet-5) and ~1e-7 relative (MLP) in float64 over 100 steps, and in
    float32 to the algorithm's own float32 rounding (the port's float32 and float64 runs differ
    by as much). Kaldi's C++ version additionally forms Z_t in double precision and
    re-orthogonalizes W_{t+1} when Z_t is ill-conditioned or floored; neither the port nor this
    class does.

    *Fewer rows than the rank.* A factor whose tensor has fewer than R rows (a bias has one; the
    256-wide factor of a 10×256 output layer has ten) updates from rank-deficient data: Z_t has
    eigenvalues at rounding level, the corresponding directions of W are not determined by the
    data and their eigenvalues are floored. This is harmless for the step (those directions get
    weight ≈ d/β, tiny), but it is where float32 rounding shows most.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.01,
        *,
        alpha: float = 4.0,
        eps: float = 1e-10,
        rank: int = 80,
        update_period: int = 4,
        eta: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "eps": eps,
            "rank": rank,
            "update_period": update_period,
            "eta": eta,
            "momentum": momentum,
            "weight_decay": weight_decay,
        }
        _check_group(defaults)
        super().__init__(params, defaults)
        self.stats: dict[str, float | int] = {}
        self._warned = False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update; ``closure`` (optional) re-evaluates the loss with gradients enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kappas: list[float] = []
        traces: list[float] = []
        sq_norm = 0.0
        restarts = 0
        for group in self.param_groups:
            settings = _settings(group)
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("OnlineNGD does not support sparse gradients")
                grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                state = self.state[p]
                if "factors" not in state:
                    state["factors"] = _new_factors(p, group["rank"], settings)
                before = sum(f.get("restarts", 0) for f in state["factors"].values())
                direction = precondition(grad, state["factors"], settings)
                for f in state["factors"].values():
                    kappa, trace = smoothing(f, settings.alpha)
                    kappas.append(kappa)
                    traces.append(trace)
                restarts += sum(f.get("restarts", 0) for f in state["factors"].values()) - before
                if mu != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = direction.clone()
                    else:
                        buf.mul_(mu).add_(direction)
                    direction = buf
                sq_norm += lr * lr * float(torch.linalg.vector_norm(direction)) ** 2
                p.add_(direction, alpha=-lr)
        if restarts and not self._warned:
            self._warned = True
            warnings.warn(
                "OnlineNGD: a Fisher factor produced a non-finite preconditioned gradient; it was "
                "reset and that gradient used unpreconditioned (stats['restarts'] counts these).",
                stacklevel=2,
            )
        self.stats = {
            "kappa": sum(kappas) / len(kappas) if kappas else math.nan,
            "fisher_trace": sum(traces) / len(traces) if traces else math.nan,
            "update_norm": math.sqrt(sq_norm),
            "num_factors": len(kappas),
            "restarts": restarts,
        }
        return loss
