"""The parameter update of NGD: heavy-ball momentum on the direction and decoupled weight decay.

::

    m ← μ·m + Δ,     θ ← (1 − lr·wd)·θ − lr·m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    sq_norm = 0.0
    for p, d_p, state in zip(params, directions, states, strict=True):
        if momentum > 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d_p.clone()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(d_p)
            d_p = buf
        if weight_decay > 0:
            update = d_p * lr + p * (lr * weight_decay)
            flat_update = update.reshape(-1)
            sq_norm += float(flat_update @ flat_update)
            p.sub_(update)
        else:
            flat_dir = d_p.reshape(-1)
            sq_norm += lr * lr * float(flat_dir @ flat_dir)
            p.add_(d_p, alpha=-lr)
    return math.sqrt(sq_norm)
