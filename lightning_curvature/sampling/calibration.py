"""Choosing the SGLD step size: short chains over a grid of (ε, γ), with the evidence.

SGLD has no accept/reject step, so a step size that is too large does not fail loudly: the chain
becomes unstable in the stiffest direction (ε·nβ·h/2 > 2 for a curvature h) and the loss runs
away, or, just below that, the discretization inflates the sampled loss and λ̂. A step size that
is too small mixes slowly and leaves λ̂ biased towards its starting value. The usual advice
(devinterp's calibration notebook; Lau et al. 2023, App. on hyperparameters) is to take the
largest step size whose chains stay healthy; :func:`calibrate_sgld` does that sweep and keeps
the traces to look at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
from torch import nn

from ..checks import ArgumentError, check_float, check_int
from ..curvature.functional import LossFn
from .llc import estimate_llc
from .result import LLCEstimate

__all__ = ["CalibrationRow", "SGLDCalibration", "calibrate_sgld"]


@dataclass(frozen=True)
class CalibrationRow:
    """One ``(localization, step_size)`` configuration of a sweep (rules: :func:`calibrate_sgld`).

    Attributes
    ----------
    step_size, localization : float
        ε and γ.
    llc_mean, llc_std, r_hat, llc_drift : float
        As in :class:`LLCEstimate` for the short run.
    num_diverged : int
        Chains excluded (runaway or non-finite gradient).
    exceeds_bound : bool
        Rule 2: mean λ̂ above d/2.
    growth : float
        Rule 3: ``(λ̂ ratio)/(ε ratio)`` against the next smaller ε (``nan`` for the first).
    superlinear : bool
        ``growth > max_growth``.
    stable : bool
        All four rules pass.

    ``row["step_size"]`` still reads a field (rows were dicts before).
    """

    step_size: float
    localization: float
    llc_mean: float
    llc_std: float
    r_hat: float
    llc_drift: float
    num_diverged: int
    exceeds_bound: bool
    stable: bool
    growth: float = math.nan
    superlinear: bool = False

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


@dataclass(frozen=True)
class SGLDCalibration:
    """Result of :func:`calibrate_sgld`.

    Attributes
    ----------
    rows : tuple of CalibrationRow
        One per ``(localization, step_size)``, γ-major then increasing ε.
    estimates : tuple of LLCEstimate
        The short-run estimates, in ``rows`` order (traces included).
    recommended_step_size : float or None
        Largest stable step size (for ``recommended_localization``); ``None`` if none is stable.
    recommended_localization : float or None
        The localization it was found with (the smallest swept γ that has a stable step, since
        a weaker pull biases λ̂ least).
    dim : int
        Number of sampled parameters (λ ≤ d/2 is the bound used by ``exceeds_bound``).
    seconds : float
        Wall time of the sweep.
    """

    rows: tuple[CalibrationRow, ...]
    estimates: tuple[LLCEstimate, ...]
    recommended_step_size: float | None
    recommended_localization: float | None
    dim: int
    seconds: float
    notes: tuple[str, ...] = field(default=())

    def table(self) -> str:
        """The sweep as a plain-text table (one line per configuration)."""
        head = (
            f"{'gamma':>9} {'step_size':>10} {'llc_mean':>11} {'llc_std':>9} {'r_hat':>7} "
            f"{'drift':>10} {'diverged':>8} {'>d/2':>5} {'growth':>7} {'stable':>6}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            mark = " <- recommended" if (
                r.step_size == self.recommended_step_size
                and r.localization == self.recommended_localization
            ) else ""  # fmt: skip
            lines.append(
                f"{r.localization:>9.3g} {r.step_size:>10.3g} {r.llc_mean:>11.5g} "
                f"{r.llc_std:>9.3g} {r.r_hat:>7.3f} {r.llc_drift:>10.4g} "
                f"{r.num_diverged:>8d} {'yes' if r.exceeds_bound else 'no':>5} "
                f"{r.growth:>7.2f} {'yes' if r.stable else 'no':>6}{mark}"
            )
        return "\n".join(lines)

    def figure(self, *, max_abs_llc: float | None = None):
        """Matplotlib figure: per localization, the running λ̂ and the loss trace per step size.

        Top row: ``nβ·(running mean of the chain-mean loss − L_n(w*))`` against the draw
        (a usable step size levels off); bottom row: the chain-mean minibatch loss itself
        (diverged configurations are drawn dashed until they leave the axes).
        """
        import matplotlib.pyplot as plt

        gammas = sorted({r.localization for r in self.rows})
        fig, axes = plt.subplots(
            2, len(gammas), figsize=(5.5 * len(gammas), 7), squeeze=False, sharex=True
        )
        steps = sorted({r.step_size for r in self.rows})
        cmap = plt.get_cmap("viridis")
        for j, gamma in enumerate(gammas):
            ax_llc, ax_loss = axes[0, j], axes[1, j]
            for r, est in zip(self.rows, self.estimates, strict=True):
                if r.localization != gamma:
                    continue
                color = cmap(steps.index(r.step_size) / max(len(steps) - 1, 1))
                trace = np.concatenate([est.burnin_trace, est.loss_trace], axis=1)
                with np.errstate(invalid="ignore", over="ignore"):
                    mean_trace = trace.mean(axis=0)
                # Runaway values would overflow the log axis; they leave the plot instead.
                mean_trace = np.where(
                    np.isfinite(mean_trace) & (np.abs(mean_trace) < 1e30), mean_trace, np.nan
                )
                running = est.nbeta * (
                    np.cumsum(mean_trace) / np.arange(1, mean_trace.size + 1) - est.init_loss
                )
                style = "-" if r.stable else "--"
                label = f"ε={r.step_size:.2g}" + ("" if r.stable else " (unstable)")
                ax_llc.plot(running, style, color=color, label=label)
                ax_loss.plot(mean_trace, style, color=color, lw=0.8)
            ax_llc.set_title(f"γ = {gamma:g}")
            ax_llc.set_ylabel("running λ̂")
            ax_loss.set_ylabel("minibatch loss (chain mean)")
            ax_loss.set_xlabel("SGLD step")
            ax_loss.set_yscale("log")
            stable = [
                est.llc_mean
                for r, est in zip(self.rows, self.estimates, strict=True)
                if r.stable and r.localization == gamma
            ]
            bound = max_abs_llc
            if bound is None:
                # Zoom on the stable runs: a diverged run would flatten every other curve.
                bound = 1.5 * max([abs(v) for v in stable] + [1e-12]) if stable else self.dim / 2
            ax_llc.set_ylim(-bound, bound)
            stable_losses = [
                np.concatenate([est.burnin_trace, est.loss_trace], axis=1)
                for r, est in zip(self.rows, self.estimates, strict=True)
                if r.stable and r.localization == gamma
            ]
            if stable_losses:
                lo = min(float(np.min(t)) for t in stable_losses)
                hi = max(float(np.max(t)) for t in stable_losses)
                if lo > 0 and np.isfinite(hi):
                    ax_loss.set_ylim(0.8 * lo, 10 * hi)
            ax_llc.axhline(0.0, color="grey", lw=0.5)
            ax_llc.legend(fontsize=7)
        fig.tight_layout()
        return fig


def calibrate_sgld(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    *,
    step_sizes: Sequence[float] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    localizations: Sequence[float] = (100.0,),
    num_chains: int = 2,
    num_steps: int = 200,
    nbeta: float | None = None,
    n: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    eval_mode: bool | None = True,
    runaway_factor: float = 100.0,
    max_growth: float = 1.3,
    vectorize: bool | None = None,
    **llc_kwargs,
) -> SGLDCalibration:
    """Sweep step sizes (and localizations) on short chains; recommend the largest stable ε.

    A configuration is *stable* when

    1. none of its chains diverged (runaway rule of ``diagnostics``) and every per-chain λ̂ is
       finite;
    2. the mean λ̂ does not exceed d/2 (the learning coefficient of a d-parameter model is at
       most d/2, so a larger value is discretization blow-up);
    3. λ̂ does not grow super-linearly in ε: ``(λ̂_k/λ̂_{k−1}) / (ε_k/ε_{k−1}) <= max_growth``
       against the next smaller ε. Below the stability limit, λ̂ is either still rising
       because the short chain has not mixed (at most ~linear in ε: the distance travelled
       grows with the step) or has levelled off (flat in ε up to an O(ε) bias); a jump faster
       than the step-size ratio is the chain escaping a direction whose curvature h violates
       ε·nβ·h/2 < 2 (the loss then reaches far above its equilibrium excess, typically with a
       negative half-to-half drift as it relaxes). This rule is a heuristic; the figure shows
       the evidence;
    4. every smaller ε (same γ) is stable: the first failure ends the usable range.

    The recommendation is the largest stable ε for the smallest γ that has one. The split-R̂
    and the half-to-half drift of each row tell whether ``num_steps`` was long enough at that
    ε (small ε: still climbing).

    Parameters
    ----------
    model, loss_fn, data, nbeta, n, batch_size, seed, eval_mode, vectorize
        As in :func:`estimate_llc`.
    step_sizes : sequence of float
        Candidate ε (> 0).
    localizations : sequence of float
        Candidate γ (>= 0).
    num_chains, num_steps : int
        Short chains: ``num_steps`` draws each, no burn-in (the whole trace is the evidence).
    runaway_factor : float
        Runaway rule scale.
    max_growth : float
        Largest accepted ``(λ̂ ratio) / (ε ratio)`` between neighbouring step sizes (rule 3).
    **llc_kwargs
        Passed to :func:`estimate_llc` (e.g. ``params``, ``init_loss``).

    Returns
    -------
    SGLDCalibration
    """
    steps = _checked_grid("step_sizes", step_sizes, low_open=True)
    gammas = _checked_grid("localizations", localizations, low_open=False)
    check_float("max_growth", max_growth, low=0.0, low_open=True)
    check_int("num_chains", num_chains, minimum=1)
    check_int("num_steps", num_steps, minimum=1)
    rows: list[CalibrationRow] = []
    estimates: list[LLCEstimate] = []
    seconds = 0.0
    init_loss = llc_kwargs.pop("init_loss", None)
    for gamma in gammas:
        for eps in steps:
            est = estimate_llc(
                model,
                loss_fn,
                data,
                num_chains=num_chains,
                num_draws=num_steps,
                num_burnin=0,
                step_size=eps,
                localization=gamma,
                nbeta=nbeta,
                n=n,
                batch_size=batch_size,
                seed=seed,
                eval_mode=eval_mode,
                runaway_factor=runaway_factor,
                vectorize=vectorize,
                init_loss=init_loss,
                warn=False,
                **llc_kwargs,
            )
            init_loss = est.init_loss  # computed once, reused for the rest of the grid
            seconds += est.seconds
            rows.append(_row_of(est))
            estimates.append(est)
    rows = _apply_growth_rule(rows, gammas, max_growth)
    best_eps = best_gamma = None
    for gamma in gammas:
        ok = [r.step_size for r in rows if r.localization == gamma and r.stable]
        if ok:
            best_eps, best_gamma = max(ok), gamma
            break
    notes = []
    if best_eps is None:
        notes.append("no swept step size is stable: try smaller step sizes or a larger γ")
    elif best_eps == steps[-1]:
        notes.append("the largest swept step size is stable: larger ones may be too")
    return SGLDCalibration(
        tuple(rows), tuple(estimates), best_eps, best_gamma, estimates[0].dim, seconds,
        tuple(notes),
    )  # fmt: skip


def _checked_grid(name: str, values: Sequence[float], *, low_open: bool) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        bound = "> 0" if low_open else ">= 0"
        raise ArgumentError(
            f"`{name}` must be a non-empty sequence of finite values {bound}, got {values!r}"
        )
    return sorted(
        check_float(f"{name}[{i}]", v, low=0.0, low_open=low_open)  # type: ignore[misc]
        for i, v in enumerate(values)
    )


def _row_of(est: LLCEstimate) -> CalibrationRow:
    """Rules 1 and 2 for one short run (rules 3 and 4 need the neighbours)."""
    finite = bool(np.all(np.isfinite(est.llc_per_chain)))
    exceeds = bool(finite and est.llc_mean > est.dim / 2)
    excluded = len(est.diverged_chains) + len(est.nan_gradient_chains)
    return CalibrationRow(
        step_size=est.step_size,
        localization=est.localization,
        llc_mean=est.llc_mean,
        llc_std=est.llc_std,
        r_hat=est.r_hat,
        llc_drift=est.llc_drift,
        num_diverged=excluded,
        exceeds_bound=exceeds,
        stable=excluded == 0 and finite and not exceeds,
    )


def _apply_growth_rule(
    rows: list[CalibrationRow], gammas: list[float], max_growth: float
) -> list[CalibrationRow]:
    """Rules 3 and 4, per γ in increasing ε: the first unstable ε ends the usable range."""
    out = list(rows)
    for gamma in gammas:
        prev, broken = None, False
        for i, r in enumerate(out):
            if r.localization != gamma:
                continue
            growth = math.nan
            if prev is not None and prev.llc_mean > 0 and math.isfinite(r.llc_mean):
                growth = (r.llc_mean / prev.llc_mean) / (r.step_size / prev.step_size)
            superlinear = bool(math.isfinite(growth) and growth > max_growth)
            broken = broken or not r.stable or superlinear
            out[i] = replace(r, growth=growth, superlinear=superlinear, stable=not broken)
            prev = out[i]
    return out
