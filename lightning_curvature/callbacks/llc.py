"""``LocalLearningCoefficient``: λ̂ (and WBIC) by SGLD around the current weights, each epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
from typing_extensions import override

from lightning_curvature import sampling
from lightning_curvature.checks import check_float, check_int

from .base import CurvatureCallback, Measurement, MeasurementContext
from .measurement_set import derive_seed

__all__ = ["LocalLearningCoefficient"]


class LocalLearningCoefficient(CurvatureCallback):
    """Log ``llc/lambda_hat``, ``llc/lambda_hat_std``, ``llc/init_loss`` and ``llc/wbic``.

    SGLD samples the localized tempered posterior
    ``p(w) ∝ exp(−nβ·L_n(w) − (γ/2)‖w − w*‖²)`` and
    ``λ̂ = nβ·(E_w[L_n(w)] − L_n(w*))`` (Lau, Furman, Wang, Murfet & Wei 2023, "The Local
    Learning Coefficient: A Singularity-Aware Complexity Measure"). ``n`` is the size of the
    training set; ``L_n`` is estimated on the ``num_samples`` measurement samples, from which SGLD
    draws minibatches of ``batch_size``. ``llc/wbic`` (``n·E_w[L_n(w)]``, Watanabe 2013) is logged
    only at ``nbeta = n/ln n`` (the default). Also logged: ``bands/llc/lambda_hat_lower`` /
    ``bands/llc/lambda_hat_upper`` (mean ∓ std, for the dashboard), ``diagnostics/llc/r_hat``
    and ``diagnostics/llc/diverged_chains``, and the figure ``llc/trace`` (per-chain draw
    losses). ``L_n(w*)`` is the loss on the measurement set that the shared measurement of the
    epoch computed (:mod:`.shared`); with the same ``seed`` the curvature callbacks' 256 samples
    are the first 256 of these 4096.

    Under DDP the chains are split across ranks (each uses the whole measurement set) and merged
    with :meth:`LLCEstimate.merge`, which equals a single-process run.

    Parameters
    ----------
    num_chains, num_draws, num_burnin : int
        SGLD chains, recorded steps and discarded steps per chain. Cost:
        ``num_chains · (num_burnin + num_draws)`` minibatch gradients (chains run vectorized).
        Defaults 4, 40, 20: 240 gradients of 64 samples, about 45% of an epoch per
        measurement (MLP 784-256-256-10, one CPU thread, docs/benchmarks.md). What it buys:
        λ̂ with a chain-to-chain std of ~13% and R̂ ≈ 1.02; on a
        trained MLP the value was ~20% above an 8 × (50 + 100) run, so compare λ̂ across runs
        at equal settings.
    step_size : float
        SGLD step ε. Default 1e-4.
    localization : float
        γ. Default 100.
    nbeta : float, optional
        nβ; default ``n / ln n``.
    batch_size : int
        SGLD minibatch size. Default 64.
    num_samples : int
        Samples SGLD draws its minibatches from (and L_n(w*) is computed on). Default 4096.
    every_n_epochs : int
        Default 5 (about 9% of an epoch amortized on the MLP 784-256-256-10 with 60,000
        images; about a quarter of a measurement is drawing the Gaussian noise).
    runaway_factor : float
        A chain whose draw loss exceeds ``runaway_factor`` times the initial loss is reported
        diverged (> 1). Default 100.
    seed, loss_fn, eval_mode, measure_on_train_start, name
        See :class:`~lightning_curvature.callbacks.base.CurvatureCallback`.

    Notes
    -----
    Measured costs are for an MLP 784-256-256-10 on one CPU thread, relative to one
    Fashion-MNIST training epoch at batch 128 (``benchmarks/overhead.py``,
    ``docs/benchmarks.md``).
    """

    shard_measurement_set = False

    def __init__(
        self,
        *,
        num_chains: int = 4,
        num_draws: int = 40,
        num_burnin: int = 20,
        step_size: float = 1e-4,
        localization: float = 100.0,
        nbeta: float | None = None,
        num_samples: int | None = 4096,
        batch_size: int | None = 64,
        every_n_epochs: int = 5,
        runaway_factor: float = 100.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_samples=num_samples, batch_size=batch_size, every_n_epochs=every_n_epochs, **kwargs
        )
        self.num_chains: int = check_int("num_chains", num_chains, minimum=1)  # type: ignore[assignment]
        self.num_draws: int = check_int("num_draws", num_draws, minimum=1)  # type: ignore[assignment]
        self.num_burnin: int = check_int("num_burnin", num_burnin, minimum=0)  # type: ignore[assignment]
        self.step_size = check_float("step_size", step_size, low=0.0, low_open=True)
        self.localization = check_float("localization", localization, low=0.0)
        self.nbeta = check_float("nbeta", nbeta, low=0.0, low_open=True, allow_none=True)
        self.runaway_factor = check_float("runaway_factor", runaway_factor, low=1.0, low_open=True)

    @override
    def gather_batch_size(self) -> int | None:
        # The engine draws SGLD minibatches itself from one gathered tensor pair.
        return None

    @override
    def memory_bytes(self, dim: int, num_samples: int) -> int:
        # Vectorized chains: parameters, gradients and the localization anchor per chain.
        draws = self.num_chains * (self.num_draws + self.num_burnin)
        return 4 * 4 * dim * self.num_chains + 8 * 2 * draws

    @override
    def measure(self, ctx: MeasurementContext) -> Measurement:
        chains = list(range(self.num_chains))
        local = chains[ctx.dist.rank :: ctx.dist.world_size]
        seed = derive_seed(self.seed, ctx.step, 0x11C)
        part: sampling.LLCEstimate | None = None
        if local:
            with ctx.progress(f"SGLD, {len(local)} chains", len(local)) as bar:
                part = sampling.estimate_llc(
                    ctx.pl_module,
                    ctx.loss_fn,
                    ctx.data,
                    num_chains=self.num_chains,
                    num_draws=self.num_draws,
                    num_burnin=self.num_burnin,
                    step_size=self.step_size,
                    localization=self.localization,
                    nbeta=self.nbeta,
                    n=max(ctx.dataset_size, 2),
                    batch_size=self.batch_size,
                    seed=seed,
                    chain_indices=local,
                    eval_mode=ctx.eval_mode,
                    init_loss=ctx.center_loss,
                    runaway_factor=self.runaway_factor,
                )
                bar.update(len(local))
        parts = [p for p in ctx.dist.all_gather_object(part) if p is not None]
        est = parts[0] if len(parts) == 1 else sampling.LLCEstimate.merge(parts)
        mean, std = est.llc_mean, est.llc_std
        scalars: dict[str, float] = {
            "llc/lambda_hat": mean,
            "llc/lambda_hat_std": std,
            "bands/llc/lambda_hat_lower": mean - std,
            "bands/llc/lambda_hat_upper": mean + std,
            "llc/init_loss": est.init_loss,
            # 1 when the chains found lower loss next to w*: λ̂ is then no complexity measure.
            "llc/not_minimum": 0.0 if est.at_minimum else 1.0,
            "diagnostics/llc/diverged_chains": float(len(est.diverged_chains)),
            "diagnostics/llc/nan_gradient_chains": float(len(est.nan_gradient_chains)),
        }
        if est.wbic is not None:
            scalars["llc/wbic"] = est.wbic
        if np.isfinite(est.r_hat):
            scalars["diagnostics/llc/r_hat"] = est.r_hat
        trace = np.atleast_2d(np.asarray(est.loss_trace, dtype=np.float64))
        init_loss = est.init_loss
        return Measurement(
            scalars=scalars,
            figures={"llc/trace": lambda: _trace_figure(trace, init_loss, ctx.step)},
        )


def _trace_figure(trace: np.ndarray, init_loss: float, epoch: int) -> Any:
    from matplotlib.figure import Figure

    # A fixed layout: matplotlib's constrained layout was about half the cost of drawing this.
    fig = Figure(figsize=(6, 3.6), dpi=100)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.15, top=0.9)
    ax = fig.add_subplot()
    for c, row in enumerate(trace):
        ax.plot(row, lw=0.8, label=f"chain {c}")
    ax.axhline(init_loss, color="k", lw=0.8, ls="--", label="L_n(w*)")
    ax.set_xlabel("draw")
    ax.set_ylabel("minibatch loss")
    ax.set_title(f"SGLD chains, epoch {epoch}")
    ax.legend(fontsize=7, loc="upper right")
    return fig
