"""Health checks for SGLD chains: split R-hat and the runaway rule.

Runaway rule (what :func:`divergence_threshold` encodes). Near a local minimum the localized
tempered posterior has mean excess loss ``E[L_n(w) − L_n(w*)] = λ/nβ ≤ d/(2nβ)`` (the learning
coefficient of a d-parameter model is at most d/2, reached by regular models), and a single
draw fluctuates around that by ``O(√d + log T)/nβ``; a minibatch loss adds the minibatch noise
``σ_B`` (the standard deviation of batch-mean losses at w* over batches of the SGLD size). A chain
is *diverged* when any of its losses (burn-in included) is non-finite or exceeds

    L_n(w*) + runaway_factor · (d/2 + 10)/nβ + 10·σ_B

(``runaway_factor`` = 100 by default), i.e. when it has left the neighbourhood that the
posterior can reach by two orders of magnitude: in practice the SGLD discretization has become
unstable (step size too large for the curvature), and its loss would grow without bound.
Slower, bounded drift (a chain that has not converged) is what split-R̂ reports instead.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import check_float

__all__ = ["diverged_rows", "divergence_threshold", "geweke_z", "split_r_hat"]


def divergence_threshold(
    init_loss: float,
    *,
    dim: int,
    nbeta: float,
    minibatch_loss_std: float = 0.0,
    runaway_factor: float = 100.0,
) -> float:
    """The loss above which a chain counts as run away (see the module docstring)."""
    check_float("runaway_factor", runaway_factor, low=0.0, low_open=True)
    check_float("minibatch_loss_std", minibatch_loss_std)
    return float(
        init_loss + runaway_factor * (dim / 2 + 10) / nbeta + 10.0 * max(minibatch_loss_std, 0.0)
    )


def diverged_rows(traces: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of rows (chains) with a non-finite loss or a loss above ``threshold``."""
    traces = np.asarray(traces, dtype=np.float64)
    if traces.ndim != 2:
        raise ValueError(f"traces must be 2-D (chains x steps), got shape {traces.shape}")
    if traces.shape[1] == 0:
        return np.zeros(traces.shape[0], dtype=bool)
    bad = ~np.isfinite(traces) | (traces > threshold)
    return bad.any(axis=1)


def split_r_hat(traces: np.ndarray) -> float:
    """Split potential scale reduction factor R̂ of a ``(chains, draws)`` array.

    Each chain is cut into halves (the middle draw is dropped for odd lengths), giving ``m``
    sequences of length ``L``; with ``W`` the mean within-sequence variance and ``B/L`` the
    variance of the sequence means,

        R̂ = sqrt( ((L − 1)/L · W + B/L) / W ).

    Values near 1 mean the halves agree; a loss trace that still trends (no or too short
    burn-in) or chains that disagree give R̂ > 1 (1.01–1.1 are the usual alarm levels).
    Gelman et al., *Bayesian Data Analysis*, 3rd ed., §11.4. Returns ``nan`` with fewer than
    4 draws or zero within-sequence variance (R̂ is undefined there).
    """
    x = np.asarray(traces, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"traces must be 2-D (chains x draws), got shape {x.shape}")
    chains, draws = x.shape
    half = draws // 2
    if chains == 0 or half < 2:
        return math.nan
    seqs = np.concatenate([x[:, :half], x[:, draws - half :]], axis=0)
    means = seqs.mean(axis=1)
    within = seqs.var(axis=1, ddof=1).mean()
    if not np.isfinite(within) or within <= 0:
        return math.nan
    between_over_len = means.var(ddof=1)
    var_plus = (half - 1) / half * within + between_over_len
    return float(math.sqrt(var_plus / within))


def _mean_and_var_of_mean(seg: np.ndarray) -> tuple[float, float]:
    """Mean of a 1-D segment and the variance of that mean by non-overlapping batch means."""
    k = max(2, min(10, seg.size // 5))
    usable = seg[: (seg.size // k) * k].reshape(k, -1)
    batch_means = usable.mean(axis=1)
    return float(seg.mean()), float(batch_means.var(ddof=1) / k)


def geweke_z(traces: np.ndarray, first: float = 0.1, last: float = 0.5) -> float:
    """Pooled Geweke z-score: early-window mean against late-window mean, across chains.

    For every chain, the mean of its first ``first`` fraction of draws is compared with the mean
    of its last ``last`` fraction; the variances of both means come from non-overlapping batch
    means (which absorb short-range autocorrelation). Pooled over chains,

        z = Σ_c (m_late,c − m_early,c) / sqrt(Σ_c (v_early,c + v_late,c)).

    A chain started at w* whose loss is still climbing (no or too short burn-in) has z ≫ 0; a
    stationary chain has z ~ N(0, 1). Geweke (1992), "Evaluating the accuracy of
    sampling-based approaches to the calculation of posterior moments". Returns ``nan`` when a
    window has fewer than 4 draws or the variances vanish.
    """
    x = np.asarray(traces, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"traces must be 2-D (chains x draws), got shape {x.shape}")
    check_float("first", first)
    check_float("last", last)
    if not (0 < first < 1 and 0 < last < 1 and first + last <= 1):
        raise ValueError(
            f"first and last must be fractions in (0, 1) with sum <= 1, got {first}, {last}"
        )
    n_first, n_last = int(first * x.shape[1]), int(last * x.shape[1])
    if x.shape[0] == 0 or n_first < 4 or n_last < 4:
        return math.nan
    diff = var = 0.0
    for row in x:
        m_a, v_a = _mean_and_var_of_mean(row[:n_first])
        m_b, v_b = _mean_and_var_of_mean(row[row.size - n_last :])
        diff += m_b - m_a
        var += v_a + v_b
    if not (np.isfinite(var) and var > 0):
        return math.nan
    return float(diff / math.sqrt(var))
