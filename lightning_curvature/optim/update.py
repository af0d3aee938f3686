"""The parameter update of NGD: heavy-ball momentum on the direction and decoupled weight decay.

::

    m ← μ·m + Δ,     θ ← (1 − lr·wd)·θ − lr·m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["apply_update"]


def apply_update(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    states: Sequence[dict],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> float:
    """Update ``params`` in place from ``directions`` (same shapes); return ``‖θ_new − θ_old‖``.

    ``states[k]`` is parameter k's optimizer state; its ``"momentum_buffer"`` is created on the
    first step with momentum (as ``torch.optim.SGD`` does: ``m₁ = Δ₁``). Weight decay is
    decoupled (AdamW-style): coupled L2 would add ``wd·θ`` to the gradient, a vector outside
    the span of the Fisher that the solve multiplies by up to 1/κ.
    """
    params, directions = list(params), list(directions)
    if not params:
        return 0.0
    # Multi-tensor (foreach) kernels: one dispatch per operation for all parameters.
    if momentum > 0:
        bufs = []
        for d_p, state in zip(directions, states, strict=True):
            buf = state.get("momentum_buffer")
            if buf is None:
                state["momentum_buffer"] = d_p.clone()
            else:
                bufs.append((buf, d_p))
        if bufs:
            torch._foreach_mul_([b for b, _ in bufs], momentum)
            torch._foreach_add_([b for b, _ in bufs], [d for _, d in bufs])
        directions = [state["momentum_buffer"] for state in states]
    if weight_decay > 0:
        updates = torch._foreach_mul(directions, lr)
        torch._foreach_add_(updates, params, alpha=lr * weight_decay)
        norms = torch._foreach_norm(updates)
        torch._foreach_sub_(params, updates)
        scale = 1.0
    else:
        norms = torch._foreach_norm(directions)
        torch._foreach_add_(params, directions, alpha=-lr)
        scale = lr
    sq_norm = float(torch.stack(norms).double().square().sum())
    return scale * math.sqrt(sq_norm)
