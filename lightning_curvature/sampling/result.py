"""The typed, frozen result of an LLC estimate: settings, traces, diagnostics and cost.

:class:`LLCEstimate` holds the headline numbers (``llc_mean``, ``llc_std``, ``llc_stderr``,
``llc_per_chain``, ``init_loss``, ``wbic``) and four nested frozen records:

* :class:`SGLDSettings` — what was run (ε, γ, nβ, n, minibatch, dimension, seed, runaway limit);
* :class:`LLCTraces` — the per-chain loss traces the statistics are computed from;
* :class:`LLCDiagnostics` — health of the chains and of the point w* (``converged``,
  ``at_minimum``, R̂, Geweke z, drift, diverged / non-finite-gradient chains, messages);
* :class:`LLCCost` — gradient evaluations, wall time, whether the chains ran vectorized.

Every field of the nested records is also readable on the estimate itself under the name it had
when the estimate was one flat dataclass (``est.r_hat``, ``est.loss_trace``, ``est.step_size``,
…), so existing readers keep working; lists are returned as fresh ``list`` copies and the trace
arrays are read-only.

Rules (all computed in :meth:`LLCEstimate.from_traces`, so a merge of DDP parts applies them to
the merged chains):

*Divergence* — a chain whose loss (burn-in included) is non-finite or above the runaway limit of
:mod:`~lightning_curvature.sampling.diagnostics` is excluded from every statistic, unless its
first bad value follows a non-finite *gradient* at a finite loss: those chains are reported
separately (``nan_gradient_chains``), because the cause is the model or loss (not
differentiable where it was evaluated), not the step size.

*Convergence* — no excluded chain, split-R̂ ≤ :data:`R_HAT_THRESHOLD`, and not (|Geweke z| >
:data:`GEWEKE_THRESHOLD` and |drift| > :data:`DRIFT_TOLERANCE`·|λ̂|).

*At a minimum* — λ̂ = nβ·(E_w[L_n(w)] − L_n(w*)) is a complexity only if w* is a local minimum
of L_n: then the localized posterior sits in a basin where L_n(w) ≥ L_n(w*), and λ̂ ≥ 0 up to
Monte Carlo error. A significantly negative λ̂ means the chains found lower loss next to w*.
``at_minimum`` is ``False`` when, over the healthy chains, either

1. the mean λ̂ is below zero by more than its standard error (λ̂ + s.e.(λ̂) < 0), or
2. the second half of the draws alone gives λ̂₂ = nβ·(mean late draw loss − L_n(w*)) below zero
   by more than its standard error (chains still sliding downhill: their late loss lies below
   L_n(w*) even when the early climb of the noise keeps the overall mean above it).

3. some chain's loss (burn-in included, excluded chains too) fell below L_n(w*) by more than
   the runaway margin ``divergence_threshold − L_n(w*)``: the mirror image of the runaway rule,
   a chain sliding down an unbounded descent direction (a saddle whose negative curvature beats
   the localization), whose trace may end non-finite and leave λ̂ undefined.

With one chain the standard errors are 0 and any negative value counts. When λ̂ is undefined
(every chain excluded) and rule 3 did not fire, there is no evidence either way and
``at_minimum`` is ``True``; the diverged-chain message says why. Lau et al. (2023),
arXiv:2308.12108, §3 (λ̂ is defined at a local minimum w*).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..checks import ArgumentError, check_int
from .diagnostics import diverged_rows, geweke_z, split_r_hat

__all__ = [
    "DRIFT_TOLERANCE",
    "GEWEKE_THRESHOLD",
    "R_HAT_THRESHOLD",
    "LLCCost",
    "LLCDiagnostics",
    "LLCEstimate",
    "LLCTraces",
    "SGLDSettings",
    "default_nbeta",
]

#: Split-R̂ above this marks an estimate as not converged (and warns).
R_HAT_THRESHOLD = 1.1
#: |Geweke z| above this (with a material drift) marks an estimate as not converged.
GEWEKE_THRESHOLD = 3.0
#: A drift of λ̂ between trace halves above this fraction of λ̂ is material.
DRIFT_TOLERANCE = 0.05


def default_nbeta(n: int) -> float:
    """nβ = n / ln n, the inverse temperature at which the WBIC is defined (Watanabe 2013)."""
    n = check_int("n", n, minimum=2)  # n/ln n needs n >= 2
    return n / math.log(n)


def _readonly(a: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True)
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class SGLDSettings:
    """What an estimate was run with.

    Attributes
    ----------
    step_size, localization, nbeta : float
        ε, γ and nβ of the SGLD update.
    n : int
        Training-set size (nβ's default and the WBIC use it).
    batch_size : int or None
        SGLD minibatch size (``None``: full batch).
    dim : int
        Number of sampled parameters.
    seed : int
        Base seed (chain ``c`` seeds from ``(seed, c)``).
    divergence_threshold : float
        Runaway limit on the loss (``diagnostics.divergence_threshold``).
    """

    step_size: float
    localization: float
    nbeta: float
    n: int
    batch_size: int | None
    dim: int
    seed: int
    divergence_threshold: float


@dataclass(frozen=True)
class LLCTraces:
    """Per-chain loss traces (read-only float64 arrays), one row per global chain id.

    Attributes
    ----------
    loss_trace : ndarray
        Minibatch draw losses ``(chains, num_draws)``.
    burnin_trace : ndarray
        Burn-in losses ``(chains, num_burnin)``.
    chain_indices : tuple of int
        Global chain ids, one per row.
    nan_gradient_step : ndarray
        ``(chains,)`` int: first step (burn-in included) at which the gradient was non-finite
        while the loss was finite; ``-1`` if never.
    """

    loss_trace: np.ndarray
    burnin_trace: np.ndarray
    chain_indices: tuple[int, ...]
    nan_gradient_step: np.ndarray

    @classmethod
    def of(
        cls,
        loss_trace: np.ndarray,
        burnin_trace: np.ndarray,
        chain_indices: Sequence[int],
        nan_gradient_step: np.ndarray | Sequence[int] | None = None,
    ) -> LLCTraces:
        """Validated, read-only copies (``nan_gradient_step`` defaults to all ``-1``)."""
        loss, burn = _readonly(loss_trace), _readonly(burnin_trace)
        ids = tuple(int(c) for c in chain_indices)
        if loss.ndim != 2 or burn.ndim != 2 or loss.shape[0] != burn.shape[0] != len(ids):
            raise ArgumentError(
                f"`traces` must be (chains, steps) arrays with one row per chain id, got "
                f"{loss.shape} and {burn.shape} for {len(ids)} ids"
            )
        if nan_gradient_step is None:
            nan_gradient_step = np.full(len(ids), -1)
        steps = _readonly(nan_gradient_step, np.int64)
        if steps.shape != (len(ids),):
            raise ArgumentError(
                f"`nan_gradient_step` must have one entry per chain, got shape {steps.shape}"
            )
        return cls(loss, burn, ids, steps)

    @property
    def num_draws(self) -> int:
        return int(self.loss_trace.shape[1])

    @property
    def num_burnin(self) -> int:
        return int(self.burnin_trace.shape[1])

    def take(self, order: Sequence[int]) -> LLCTraces:
        """Rows in the given order."""
        idx = list(order)
        return LLCTraces.of(
            self.loss_trace[idx],
            self.burnin_trace[idx],
            [self.chain_indices[i] for i in idx],
            self.nan_gradient_step[idx],
        )

    @staticmethod
    def concatenate(parts: Sequence[LLCTraces]) -> LLCTraces:
        return LLCTraces.of(
            np.concatenate([p.loss_trace for p in parts]),
            np.concatenate([p.burnin_trace for p in parts]),
            [c for p in parts for c in p.chain_indices],
            np.concatenate([p.nan_gradient_step for p in parts]),
        )


@dataclass(frozen=True)
class LLCDiagnostics:
    """Health of the chains and of the point (see the module docstring for the rules).

    Attributes
    ----------
    converged : bool
        The chains mixed (no excluded chain, R̂ and Geweke/drift within limits).
    at_minimum : bool
        ``False`` when λ̂ shows that w* is not a local minimum (rule in the module docstring).
    diverged_chains : tuple of int
        Chains excluded by the runaway rule.
    nan_gradient_chains : tuple of int
        Chains excluded because their gradient became non-finite at a finite loss.
    r_hat : float
        Split-R̂ of the healthy draw-loss traces (``nan`` if undefined).
    geweke_z : float
        Pooled Geweke z of the healthy draw losses.
    llc_drift, llc_drift_stderr : float
        λ̂ of the second half of the draws minus λ̂ of the first half, and its standard error.
    late_llc, late_llc_stderr : float
        λ̂ of the second half of the draws alone, and its standard error (rule 2).
    lowest_loss : float
        The lowest finite loss any chain reached (rule 3; ``nan`` if none is finite).
    messages : tuple of str
        Every problem found, in words (also emitted as ``RuntimeWarning`` when asked).
    """

    converged: bool
    at_minimum: bool
    diverged_chains: tuple[int, ...]
    nan_gradient_chains: tuple[int, ...]
    r_hat: float
    geweke_z: float
    llc_drift: float
    llc_drift_stderr: float
    late_llc: float
    late_llc_stderr: float
    lowest_loss: float
    messages: tuple[str, ...] = ()


@dataclass(frozen=True)
class LLCCost:
    """What an estimate cost.

    Attributes
    ----------
    num_grad_evals : int
        Minibatch gradient evaluations (chains × (burn-in + draws)), summed over merged parts.
    seconds : float
        Wall time, summed over merged parts.
    vectorized : bool
        Whether the chains were advanced together with ``vmap`` (every part, after a merge).
    """

    num_grad_evals: int
    seconds: float
    vectorized: bool


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, std (ddof=1; 0 for one value) and standard error of the mean."""
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return mean, std, std / math.sqrt(values.size)


def _per_chain_llc(trace: np.ndarray, init_loss: float, nbeta: float) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return nbeta * (trace.mean(axis=1) - init_loss)


def _drift(good: np.ndarray, nbeta: float) -> tuple[float, float]:
    """λ̂(second half) − λ̂(first half) over chains, and its standard error (nan if undefined)."""
    half = good.shape[1] // 2
    if half == 0:
        return math.nan, math.nan
    per_chain = nbeta * (good[:, good.shape[1] - half :].mean(axis=1) - good[:, :half].mean(axis=1))
    stderr = math.nan
    if per_chain.size > 1:
        stderr = float(per_chain.std(ddof=1) / math.sqrt(per_chain.size))
    return float(per_chain.mean()), stderr


def _late_llc(good: np.ndarray, init_loss: float, nbeta: float) -> tuple[float, float]:
    """λ̂ of the second half of the draws and its standard error (nan without draws)."""
    half = good.shape[1] // 2
    if half == 0:
        return math.nan, math.nan
    late = nbeta * (good[:, good.shape[1] - half :].mean(axis=1) - init_loss)
    _, _, stderr = _mean_and_stderr(late)
    return float(late.mean()), stderr


def _is_converged(excluded: bool, r_hat: float, z: float, drift: float, mean: float) -> bool:
    return (
        not excluded
        and math.isfinite(r_hat)
        and r_hat <= R_HAT_THRESHOLD
        and not (
            # Significant (Geweke) and material (λ̂ moves by more than DRIFT_TOLERANCE between
            # trace halves): with many chains a negligible drift is significant.
            math.isfinite(z)
            and abs(z) > GEWEKE_THRESHOLD
            and abs(drift) > DRIFT_TOLERANCE * abs(mean)
        )
    )


def _lowest_finite(traces: LLCTraces) -> float:
    values = np.concatenate([traces.burnin_trace.ravel(), traces.loss_trace.ravel()])
    finite = values[np.isfinite(values)]
    return float(finite.min()) if finite.size else math.nan


def _is_at_minimum(
    mean: float, stderr: float, late: float, late_stderr: float, fell_below: bool
) -> bool:
    """The three rules of the module docstring (``False``: w* is not a local minimum)."""
    below = math.isfinite(mean) and mean + stderr < 0
    late_se = late_stderr if math.isfinite(late_stderr) else 0.0
    late_below = math.isfinite(late) and late + late_se < 0
    return not (below or late_below or fell_below)


def _nan_gradient_rows(traces: LLCTraces, bad: np.ndarray) -> np.ndarray:
    # A chain whose gradient went non-finite at a finite loss carries NaN parameters from the
    # next step on; its trace then looks diverged, but the cause is the gradient.
    return bad & (traces.nan_gradient_step >= 0)


@dataclass(frozen=True)
class LLCEstimate:
    """Result of :func:`~lightning_curvature.sampling.estimate_llc` (or of merging parts).

    Attributes
    ----------
    llc_mean, llc_std, llc_stderr : float
        Mean of λ̂ over healthy chains, its standard deviation across chains (ddof=1; 0 for one
        chain) and the standard error of the mean (std/√chains).
    llc_per_chain : ndarray
        ``nβ·(mean draw loss − L_n(w*))`` for every chain run, in ``chain_indices`` order
        (excluded chains included here, but flagged and left out of every statistic).
    init_loss : float
        L_n(w*), over the whole data set.
    wbic : float or None
        ``n·E[L_n(w)]``; ``None`` unless ``nbeta == n/ln n``.
    settings : SGLDSettings
    traces : LLCTraces
    diagnostics : LLCDiagnostics
    cost : LLCCost

    The fields of the four records are also attributes of the estimate (flat aliases, kept for
    readers written against the flat result): ``step_size``, ``localization``, ``nbeta``,
    ``n``, ``batch_size``, ``dim``, ``seed``, ``divergence_threshold``; ``loss_trace``,
    ``burnin_trace``, ``chain_indices`` (list), ``num_draws``, ``num_burnin``; ``converged``,
    ``at_minimum``, ``diverged_chains`` (list), ``nan_gradient_chains`` (list), ``r_hat``,
    ``geweke_z``, ``llc_drift``, ``llc_drift_stderr``, ``warnings`` (list of the messages);
    ``num_grad_evals``, ``seconds``, ``vectorized``.
    """

    llc_mean: float
    llc_std: float
    llc_stderr: float
    llc_per_chain: np.ndarray
    init_loss: float
    wbic: float | None
    settings: SGLDSettings
    traces: LLCTraces
    diagnostics: LLCDiagnostics
    cost: LLCCost = field(default_factory=lambda: LLCCost(0, 0.0, False))

    # -- flat aliases ---------------------------------------------------------------------------
    step_size = property(lambda self: self.settings.step_size)
    localization = property(lambda self: self.settings.localization)
    nbeta = property(lambda self: self.settings.nbeta)
    n = property(lambda self: self.settings.n)
    batch_size = property(lambda self: self.settings.batch_size)
    dim = property(lambda self: self.settings.dim)
    seed = property(lambda self: self.settings.seed)
    divergence_threshold = property(lambda self: self.settings.divergence_threshold)
    loss_trace = property(lambda self: self.traces.loss_trace)
    burnin_trace = property(lambda self: self.traces.burnin_trace)
    chain_indices = property(lambda self: list(self.traces.chain_indices))
    num_draws = property(lambda self: self.traces.num_draws)
    num_burnin = property(lambda self: self.traces.num_burnin)
    converged = property(lambda self: self.diagnostics.converged)
    at_minimum = property(lambda self: self.diagnostics.at_minimum)
    diverged_chains = property(lambda self: list(self.diagnostics.diverged_chains))
    nan_gradient_chains = property(lambda self: list(self.diagnostics.nan_gradient_chains))
    r_hat = property(lambda self: self.diagnostics.r_hat)
    geweke_z = property(lambda self: self.diagnostics.geweke_z)
    llc_drift = property(lambda self: self.diagnostics.llc_drift)
    llc_drift_stderr = property(lambda self: self.diagnostics.llc_drift_stderr)
    warnings = property(lambda self: list(self.diagnostics.messages))
    num_grad_evals = property(lambda self: self.cost.num_grad_evals)
    seconds = property(lambda self: self.cost.seconds)
    vectorized = property(lambda self: self.cost.vectorized)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_traces(
        cls,
        traces: LLCTraces,
        settings: SGLDSettings,
        *,
        init_loss: float,
        cost: LLCCost,
        warn: bool = True,
    ) -> LLCEstimate:
        """Compute every statistic and diagnostic from per-chain traces (also for merges)."""
        nbeta, thr = settings.nbeta, settings.divergence_threshold
        bad = diverged_rows(np.concatenate([traces.burnin_trace, traces.loss_trace], axis=1), thr)
        grad_bad = _nan_gradient_rows(traces, bad)
        ids = traces.chain_indices
        diverged = tuple(c for c, b, g in zip(ids, bad, grad_bad, strict=True) if b and not g)
        nan_grad = tuple(c for c, g in zip(ids, grad_bad, strict=True) if g)
        per_chain = _per_chain_llc(traces.loss_trace, init_loss, nbeta)
        good = traces.loss_trace[~bad]
        messages = _exclusion_messages(traces, diverged, nan_grad, grad_bad, thr)
        if good.shape[0] == 0:
            cause = "diverged" if diverged else "hit a non-finite gradient"
            messages.append(f"every SGLD chain {cause}: the LLC is undefined (nan)")
            mean = std = stderr = drift = drift_se = r_hat = z = late = late_se = math.nan
        else:
            mean, std, stderr = _mean_and_stderr(per_chain[~bad])
            drift, drift_se = _drift(good, nbeta)
            late, late_se = _late_llc(good, init_loss, nbeta)
            r_hat, z = split_r_hat(good), geweke_z(good)
        excluded = bool(diverged or nan_grad)
        converged = _is_converged(excluded, r_hat, z, drift, mean)
        lowest = _lowest_finite(traces)
        # Rule 3: the runaway margin mirrored below L_n(w*).
        fell_below = math.isfinite(lowest) and lowest < init_loss - (thr - init_loss)
        at_minimum = _is_at_minimum(mean, stderr, late, late_se, fell_below)
        if good.shape[0] > 0 and not converged and not excluded:
            messages.append(
                f"SGLD loss traces have not converged (split R-hat {r_hat:.3f}, limit "
                f"{R_HAT_THRESHOLD}; Geweke z {z:.2f}, limit ±{GEWEKE_THRESHOLD:g}; λ̂ drift "
                f"between trace halves {drift:.4g} ± {drift_se:.2g}): the LLC is likely "
                "biased; increase num_burnin / num_draws."
            )
        if not at_minimum:
            messages.append(
                f"w* is not a local minimum (at_minimum=False): the SGLD chains found loss below "
                f"L_n(w*) = {init_loss:.6g} next to w* (λ̂ = {mean:.4g} ± {stderr:.2g}, second "
                f"half of the draws {late:.4g} ± {late_se:.2g}, lowest loss {lowest:.6g}); λ̂ "
                "is not a learning coefficient there. Measure at a (better) trained point, or "
                "read λ̂ as a descent signal."
            )
        wbic = None
        if math.isclose(nbeta, default_nbeta(settings.n), rel_tol=1e-9) and math.isfinite(mean):
            wbic = float(settings.n * (init_loss + mean / nbeta))
        if warn:
            for msg in messages:
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
        diagnostics = LLCDiagnostics(
            converged=converged,
            at_minimum=at_minimum,
            diverged_chains=diverged,
            nan_gradient_chains=nan_grad,
            r_hat=r_hat,
            geweke_z=z,
            llc_drift=drift,
            llc_drift_stderr=drift_se,
            late_llc=late,
            late_llc_stderr=late_se,
            lowest_loss=lowest,
            messages=tuple(messages),
        )
        return cls(
            llc_mean=mean,
            llc_std=std,
            llc_stderr=stderr,
            llc_per_chain=_readonly(per_chain),
            init_loss=float(init_loss),
            wbic=wbic,
            settings=settings,
            traces=traces,
            diagnostics=diagnostics,
            cost=cost,
        )

    @classmethod
    def merge(cls, parts: Sequence[LLCEstimate], *, warn: bool = True) -> LLCEstimate:
        """Combine partial results over disjoint chain subsets (e.g. one per DDP rank).

        The chains are put in global-id order and every statistic is recomputed, so merging the
        parts of a split run gives exactly the single-process result (``seconds`` and
        ``num_grad_evals`` are summed). The parts must share settings and L_n(w*).
        """
        parts = list(parts)
        if not parts:
            raise ArgumentError("`parts` must hold at least one LLCEstimate, got []")
        ref = parts[0]
        for p in parts[1:]:
            _check_mergeable(ref, p)
        ids = [c for p in parts for c in p.traces.chain_indices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"parts: chain ids overlap ({sorted(ids)})")
        merged = LLCTraces.concatenate([p.traces for p in parts])
        order = np.argsort(merged.chain_indices, kind="stable")
        cost = LLCCost(
            num_grad_evals=sum(p.num_grad_evals for p in parts),
            seconds=sum(p.seconds for p in parts),
            vectorized=all(p.vectorized for p in parts),
        )
        return cls.from_traces(
            merged.take(order), ref.settings, init_loss=ref.init_loss, cost=cost, warn=warn
        )


def _check_mergeable(ref: LLCEstimate, p: LLCEstimate) -> None:
    for k in ("nbeta", "n", "step_size", "localization", "batch_size", "dim", "seed"):
        if getattr(p.settings, k) != getattr(ref.settings, k):
            raise ValueError(
                f"parts: cannot merge estimates with different {k} "
                f"({getattr(ref.settings, k)} vs {getattr(p.settings, k)})"
            )
    if not math.isclose(p.init_loss, ref.init_loss, rel_tol=1e-6, abs_tol=1e-12):
        raise ValueError(
            f"parts: init_loss differs ({ref.init_loss} vs {p.init_loss}); every part "
            "must use the same L_n(w*)"
        )
    if p.num_draws != ref.num_draws or p.num_burnin != ref.num_burnin:
        raise ValueError("parts: num_draws / num_burnin differ between parts")


def _exclusion_messages(
    traces: LLCTraces,
    diverged: tuple[int, ...],
    nan_grad: tuple[int, ...],
    grad_bad: np.ndarray,
    threshold: float,
) -> list[str]:
    messages = []
    if nan_grad:
        first = int(traces.nan_gradient_step[grad_bad].min())
        messages.append(
            f"SGLD chains {list(nan_grad)} hit a non-finite gradient at a finite loss (first "
            f"at step {first}, burn-in included): the loss or the model is not differentiable "
            "where it was evaluated (e.g. sqrt or norm at 0, log of 0 inside a masked branch, "
            "torch.where over a NaN branch). The chains are excluded from the LLC; this is not "
            "a step-size problem."
        )
    if diverged:
        messages.append(
            f"SGLD chains {list(diverged)} diverged (non-finite loss or loss above "
            f"{threshold:.6g}); they are excluded from the LLC. Lower step_size or raise "
            "localization (see calibrate_sgld)."
        )
    return messages
