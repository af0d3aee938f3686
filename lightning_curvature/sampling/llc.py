"""The local learning coefficient (LLC) λ̂ and the WBIC from SGLD draws.

Definitions (Lau et al. 2023, "The local learning coefficient: a singularity-aware complexity
measure"; Watanabe 2013, "A widely applicable Bayesian information criterion"):

    λ̂    = nβ · ( E_w[L_n(w)] − L_n(w*) ),   w ~ p(w) ∝ exp(−nβ·L_n(w) − (γ/2)‖w − w*‖²)
    WBIC = n · E_w[L_n(w)]                    at nβ = n/ln n only.

*Draw loss.* ``E_w[L_n(w)]`` is estimated by the mean, over draws and healthy chains, of the
**minibatch** loss ``L_B_t(w_t)`` that SGLD computes anyway for its gradient at every step (the
loss of the batch that drives step t, evaluated at w_t before the update). ``B_t`` is drawn
independently of ``w_t``, so ``E[L_B_t(w_t)] = E[L_n(w_t)]``: the estimate is unbiased, costs no
extra forward pass (a full-data loss per draw would cost n/B forward passes per step), and is the
definition devinterp uses, so the two are comparable. The price is extra variance (the minibatch
noise), which the chain-to-chain standard deviation already contains. ``L_n(w*)`` is always
the full-data loss (or its first ``init_loss_batches`` batches), never a single minibatch.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from ..curvature.batches import BatchSet, as_batch_set
from ..curvature.functional import FunctionalLoss, module_mode
from ..curvature.params import ParameterLayout
from .diagnostics import diverged_rows, divergence_threshold, geweke_z, split_r_hat
from .sgld import run_sgld_chains

__all__ = ["GEWEKE_THRESHOLD", "LLCEstimate", "R_HAT_THRESHOLD", "default_nbeta", "estimate_llc"]

#: Split-R̂ above this marks an estimate as not converged (and warns).
R_HAT_THRESHOLD = 1.1
#: |Geweke z| above this (with a material drift) marks an estimate as not converged.
GEWEKE_THRESHOLD = 3.0
#: A drift of λ̂ between trace halves above this fraction of λ̂ is material.
DRIFT_TOLERANCE = 0.05

LossFn = Callable[[object, object], Tensor]


def default_nbeta(n: int) -> float:
    """nβ = n / ln n, the inverse temperature at which the WBIC is defined (Watanabe 2013)."""
    if n < 2:
        raise ValueError(f"n must be >= 2 for the default nbeta = n/ln n, got {n}")
    return n / math.log(n)


@dataclass
class LLCEstimate:
    """Result of :func:`estimate_llc` (or of merging per-rank partial results).

    Attributes
    ----------
    llc_mean, llc_std, llc_stderr : float
        Mean of λ̂ over healthy chains, its standard deviation across chains (ddof=1; 0 for one
        chain) and the standard error of the mean (std/√chains).
    llc_per_chain : ndarray
        ``nβ·(mean draw loss − L_n(w*))`` for every chain run, in ``chain_indices`` order
        (diverged chains included here, but flagged and excluded from every statistic).
    init_loss : float
        L_n(w*), over the whole data set.
    wbic : float or None
        ``n·E[L_n(w)]``; ``None`` unless ``nbeta == n/ln n``.
    loss_trace, burnin_trace : ndarray
        Minibatch draw losses ``(chains, num_draws)`` and burn-in losses ``(chains, num_burnin)``.
    nbeta : float
        Inverse temperature nβ.
    n : int
        Training-set size used for nβ and the WBIC.
    diverged_chains : list of int
        Global ids of the chains flagged by the runaway rule (see ``diagnostics``).
    r_hat : float
        Split-R̂ of the draw-loss traces of the healthy chains (``nan`` if undefined).
    llc_drift : float
        λ̂ from the second half of the draws minus λ̂ from the first half (healthy chains): a
        trace that is still climbing shows up here in λ units.
    llc_drift_stderr : float
        Standard error of ``llc_drift`` across chains (``nan`` with one chain).
    geweke_z : float
        Pooled Geweke z of the draw losses (first 10% vs last 50%, batch-means variances):
        large and positive while the loss is still climbing from L_n(w*).
    converged : bool
        No diverged chain, ``r_hat <= R_HAT_THRESHOLD``, and not (``|geweke_z| >
        GEWEKE_THRESHOLD`` and ``|llc_drift| > DRIFT_TOLERANCE·|llc_mean|``): the draw loss must
        not trend significantly *and* materially.
    num_grad_evals : int
        Minibatch gradient evaluations (chains × (burn-in + draws)).
    seconds : float
        Wall time (summed over parts after :meth:`merge`).
    chain_indices : list of int
        Global chain ids, one per row of the traces.
    """

    llc_mean: float
    llc_std: float
    llc_stderr: float
    llc_per_chain: np.ndarray
    init_loss: float
    wbic: float | None
    loss_trace: np.ndarray
    burnin_trace: np.ndarray
    nbeta: float
    n: int
    diverged_chains: list[int]
    r_hat: float
    llc_drift: float
    llc_drift_stderr: float
    geweke_z: float
    converged: bool
    num_grad_evals: int
    seconds: float
    chain_indices: list[int]
    step_size: float
    localization: float
    batch_size: int | None
    dim: int
    divergence_threshold: float
    vectorized: bool
    seed: int
    warnings: list[str] = field(default_factory=list)

    @property
    def num_draws(self) -> int:
        return int(self.loss_trace.shape[1])

    @property
    def num_burnin(self) -> int:
        return int(self.burnin_trace.shape[1])

    @classmethod
    def from_traces(
        cls,
        *,
        loss_trace: np.ndarray,
        burnin_trace: np.ndarray,
        chain_indices: Sequence[int],
        init_loss: float,
        nbeta: float,
        n: int,
        threshold: float,
        num_grad_evals: int,
        seconds: float,
        step_size: float,
        localization: float,
        batch_size: int | None,
        dim: int,
        vectorized: bool,
        seed: int,
        warn: bool = True,
    ) -> LLCEstimate:
        """Compute every statistic from per-chain traces (also used by :meth:`merge`)."""
        loss_trace = np.asarray(loss_trace, dtype=np.float64)
        burnin_trace = np.asarray(burnin_trace, dtype=np.float64)
        ids = [int(c) for c in chain_indices]
        messages: list[str] = []
        bad = diverged_rows(np.concatenate([burnin_trace, loss_trace], axis=1), threshold)
        diverged = [c for c, b in zip(ids, bad, strict=True) if b]
        with np.errstate(invalid="ignore", over="ignore"):
            per_chain = nbeta * (loss_trace.mean(axis=1) - init_loss)
        good = loss_trace[~bad]
        if diverged:
            messages.append(
                f"SGLD chains {diverged} diverged (non-finite loss or loss above "
                f"{threshold:.6g}); they are excluded from the LLC. Lower step_size or raise "
                "localization (see calibrate_sgld)."
            )
        if good.shape[0] == 0:
            messages.append("every SGLD chain diverged: the LLC is undefined (nan)")
            mean = std = stderr = drift = drift_stderr = r_hat = z = math.nan
        else:
            healthy = per_chain[~bad]
            mean = float(healthy.mean())
            std = float(healthy.std(ddof=1)) if healthy.size > 1 else 0.0
            stderr = std / math.sqrt(healthy.size)
            half = good.shape[1] // 2
            drift = drift_stderr = math.nan
            if half > 0:
                per_chain_drift = nbeta * (
                    good[:, good.shape[1] - half :].mean(axis=1) - good[:, :half].mean(axis=1)
                )
                drift = float(per_chain_drift.mean())
                if per_chain_drift.size > 1:
                    drift_stderr = float(
                        per_chain_drift.std(ddof=1) / math.sqrt(per_chain_drift.size)
                    )
            r_hat = split_r_hat(good)
            z = geweke_z(good)
        converged = (
            not diverged
            and math.isfinite(r_hat)
            and r_hat <= R_HAT_THRESHOLD
            and not (
                # Significant (Geweke) and material (λ̂ moves by more than DRIFT_TOLERANCE
                # between trace halves): with many chains a negligible drift is significant.
                math.isfinite(z)
                and abs(z) > GEWEKE_THRESHOLD
                and abs(drift) > DRIFT_TOLERANCE * abs(mean)
            )
        )
        if good.shape[0] > 0 and not converged and not diverged:
            messages.append(
                f"SGLD loss traces have not converged (split R-hat {r_hat:.3f}, limit "
                f"{R_HAT_THRESHOLD}; Geweke z {z:.2f}, limit ±{GEWEKE_THRESHOLD:g}; λ̂ drift "
                f"between trace halves {drift:.4g} ± {drift_stderr:.2g}): the LLC is likely "
                "biased; increase num_burnin / num_draws."
            )
        wbic = None
        if math.isclose(nbeta, default_nbeta(n), rel_tol=1e-9) and math.isfinite(mean):
            wbic = float(n * (init_loss + mean / nbeta))
        if warn:
            for msg in messages:
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return cls(
            llc_mean=mean,
            llc_std=std,
            llc_stderr=stderr,
            llc_per_chain=per_chain,
            init_loss=float(init_loss),
            wbic=wbic,
            loss_trace=loss_trace,
            burnin_trace=burnin_trace,
            nbeta=float(nbeta),
            n=int(n),
            diverged_chains=diverged,
            r_hat=r_hat,
            llc_drift=drift,
            llc_drift_stderr=drift_stderr,
            geweke_z=z,
            converged=converged,
            num_grad_evals=int(num_grad_evals),
            seconds=float(seconds),
            chain_indices=ids,
            step_size=float(step_size),
            localization=float(localization),
            batch_size=batch_size,
            dim=int(dim),
            divergence_threshold=float(threshold),
            vectorized=vectorized,
            seed=int(seed),
            warnings=messages,
        )

    @classmethod
    def merge(cls, parts: Sequence[LLCEstimate], *, warn: bool = True) -> LLCEstimate:
        """Combine partial results over disjoint chain subsets (e.g. one per DDP rank).

        The chains are put in global-id order and every statistic is recomputed, so merging the
        parts of a split run gives exactly the single-process result (``seconds`` and
        ``num_grad_evals`` are summed). The parts must share seed, settings and L_n(w*).
        """
        parts = list(parts)
        if not parts:
            raise ValueError("parts must hold at least one LLCEstimate")
        ref = parts[0]
        keys = ("nbeta", "n", "step_size", "localization", "batch_size", "dim", "seed")
        for p in parts[1:]:
            for k in keys:
                if getattr(p, k) != getattr(ref, k):
                    raise ValueError(
                        f"parts: cannot merge estimates with different {k} "
                        f"({getattr(ref, k)} vs {getattr(p, k)})"
                    )
            if not math.isclose(p.init_loss, ref.init_loss, rel_tol=1e-6, abs_tol=1e-12):
                raise ValueError(
                    f"parts: init_loss differs ({ref.init_loss} vs {p.init_loss}); every part "
                    "must use the same L_n(w*)"
                )
            if p.num_draws != ref.num_draws or p.num_burnin != ref.num_burnin:
                raise ValueError("parts: num_draws / num_burnin differ between parts")
        ids = [c for p in parts for c in p.chain_indices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"parts: chain ids overlap ({sorted(ids)})")
        order = np.argsort(ids, kind="stable")
        return cls.from_traces(
            loss_trace=np.concatenate([p.loss_trace for p in parts])[order],
            burnin_trace=np.concatenate([p.burnin_trace for p in parts])[order],
            chain_indices=[ids[i] for i in order],
            init_loss=ref.init_loss,
            nbeta=ref.nbeta,
            n=ref.n,
            threshold=ref.divergence_threshold,
            num_grad_evals=sum(p.num_grad_evals for p in parts),
            seconds=sum(p.seconds for p in parts),
            step_size=ref.step_size,
            localization=ref.localization,
            batch_size=ref.batch_size,
            dim=ref.dim,
            vectorized=all(p.vectorized for p in parts),
            seed=ref.seed,
            warn=warn,
        )

    def without_chains(self, chain_ids: Sequence[int]) -> LLCEstimate:
        """The estimate recomputed with the given chains dropped (no warnings)."""
        drop = set(chain_ids)
        keep = [i for i, c in enumerate(self.chain_indices) if c not in drop]
        return replace(
            LLCEstimate.from_traces(
                loss_trace=self.loss_trace[keep],
                burnin_trace=self.burnin_trace[keep],
                chain_indices=[self.chain_indices[i] for i in keep],
                init_loss=self.init_loss,
                nbeta=self.nbeta,
                n=self.n,
                threshold=self.divergence_threshold,
                num_grad_evals=self.num_grad_evals,
                seconds=self.seconds,
                step_size=self.step_size,
                localization=self.localization,
                batch_size=self.batch_size,
                dim=self.dim,
                vectorized=self.vectorized,
                seed=self.seed,
                warn=False,
            )
        )


# -- data ---------------------------------------------------------------------------------------


def _gather(
    data: object, batch_size: int | None, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, int | None]:
    """All samples as two tensors, and the SGLD minibatch size (a DataLoader's by default)."""
    if batch_size is None and not isinstance(data, (BatchSet, tuple, list)):
        batch_size = getattr(data, "batch_size", None)
    batches = as_batch_set(data, device=device, dtype=dtype).merged()
    if len(batches) != 1:
        raise ValueError(
            "data: SGLD minibatches are drawn from tensors, so inputs and targets must be "
            "tensors (got a batch structure that cannot be concatenated)"
        )
    inputs, targets = batches.batches[0]
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise ValueError("data: inputs and targets must be tensors")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"data: inputs and targets disagree on the number of samples "
            f"({inputs.shape[0]} vs {targets.shape[0]})"
        )
    return inputs, targets, batch_size


@torch.no_grad()
def _init_loss(
    floss: FunctionalLoss,
    center: Tensor,
    inputs: Tensor,
    targets: Tensor,
    chunk: int,
    max_chunks: int | None,
) -> tuple[float, float]:
    """L_n(w*) (sample-weighted over chunks) and the std of full-size chunk losses (σ_B)."""
    num = inputs.shape[0]
    total, count, full_chunk_losses = 0.0, 0, []
    for k, start in enumerate(range(0, num, chunk)):
        if max_chunks is not None and k >= max_chunks:
            break
        x, y = inputs[start : start + chunk], targets[start : start + chunk]
        loss = float(floss(center, (x, y)))
        total += loss * x.shape[0]
        count += x.shape[0]
        if x.shape[0] == chunk:
            full_chunk_losses.append(loss)
    sigma = float(np.std(full_chunk_losses, ddof=1)) if len(full_chunk_losses) > 1 else 0.0
    return total / count, sigma


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")


def estimate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    data: object,
    *,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin: int = 100,
    step_size: float = 1e-4,
    localization: float = 100.0,
    nbeta: float | None = None,
    n: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    chain_indices: Sequence[int] | None = None,
    eval_mode: bool | None = True,
    init_loss: float | None = None,
    init_loss_batches: int | None = None,
    vectorize: bool | None = None,
    runaway_factor: float = 100.0,
    params: Sequence[Tensor] | Sequence[str] | None = None,
    warn: bool = True,
) -> LLCEstimate:
    """Estimate the local learning coefficient λ̂ at the model's current weights w* with SGLD.

    Every chain starts at w* and follows

        w ← w − (ε/2)·(nβ·∇L_B(w) + γ·(w − w*)) + N(0, ε·I)

    for ``num_burnin`` steps, then ``num_draws`` more whose minibatch losses are the draws;
    ``λ̂_chain = nβ·(mean draw loss − L_n(w*))`` (see the module docstring for why the draw loss
    is the minibatch loss). Lau et al. (2023), arXiv:2308.12108, Algorithm 1.

    Parameters
    ----------
    model : nn.Module
        The model at w*. Never modified (weights, buffers, grads, mode all left as found).
    loss_fn : callable
        ``loss_fn(outputs, targets) -> mean negative log-likelihood``: ``nn.CrossEntropyLoss()``
        for classifiers; for regression a proper NLL, e.g. ``0.5·mean((f − y)²)/σ²`` for
        Gaussian noise of known σ (``nn.MSELoss`` is the NLL of σ² = 1/2 up to a constant).
    data : DataLoader, (inputs, targets) or BatchSet
        The training data, gathered once. A DataLoader's ``batch_size`` is the SGLD minibatch
        size unless ``batch_size`` is given; a tuple/BatchSet defaults to full-batch steps.
    num_chains : int
        Chains of the full run (global ids ``0 .. num_chains − 1``).
    num_draws, num_burnin : int
        Recorded steps and discarded steps per chain. Starting at w*, the loss climbs for a
        while before it fluctuates around its posterior mean: without burn-in λ̂ is biased low
        (``docs/benchmarks.md``: 200 draws without burn-in on an MLP); ``r_hat``,
        ``llc_drift`` and ``converged`` report it.
    step_size : float
        ε (> 0). The default 1e-4 (with γ = 100, nβ = n/ln n) is stable for the small
        Fashion-MNIST MLPs of ``benchmarks/llc.py``; use :func:`calibrate_sgld` for others.
    localization : float
        γ (>= 0); 100 by default, as in Lau et al. (2023).
    nbeta : float, optional
        nβ; default ``n / ln n``.
    n : int, optional
        Training-set size; default the number of samples in ``data``.
    batch_size : int, optional
        SGLD minibatch size; ``None`` with tensor data means full batch.
    seed : int
        Chain ``c`` seeds its generators from ``(seed, c)``.
    chain_indices : sequence of int, optional
        Run only these global chain ids (subset of ``range(num_chains)``), e.g. one share per
        DDP rank; :meth:`LLCEstimate.merge` of the shares equals the single-process result.
    eval_mode : bool or None
        Mode during sampling (``True`` eval, ``False`` train, ``None`` as is); restored after.
    init_loss : float, optional
        Use this L_n(w*) instead of computing it.
    init_loss_batches : int, optional
        Compute L_n(w*) on only the first this-many ``batch_size`` chunks of the data.
    vectorize : bool or None
        ``None``: chains advanced together with ``torch.func.vmap`` and, if vmap fails, one after
        the other (with a warning); ``True``/``False`` force either path.
    runaway_factor : float
        Scale of the runaway rule (see ``lightning_curvature.sampling.diagnostics``).
    params : sequence of tensors or names, optional
        Sample only these parameters (the others stay at w*). Default: all trainable ones.
    warn : bool
        Emit ``RuntimeWarning`` s for diverged or unconverged chains (they are always recorded
        in ``LLCEstimate.warnings``).

    Returns
    -------
    LLCEstimate
    """
    start_time = time.perf_counter()
    for name, value in (("num_chains", num_chains), ("num_draws", num_draws)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(num_burnin, int) or num_burnin < 0:
        raise ValueError(f"num_burnin must be an integer >= 0, got {num_burnin!r}")
    _check_positive("step_size", step_size)
    _check_positive("localization", localization, allow_zero=True)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    if chain_indices is None:
        ids = list(range(num_chains))
    else:
        ids = [int(c) for c in chain_indices]
        if len(set(ids)) != len(ids) or any(c < 0 or c >= num_chains for c in ids):
            raise ValueError(
                f"chain_indices must be distinct ids in [0, {num_chains}), "
                f"got {list(chain_indices)}"
            )

    layout = ParameterLayout.from_module(model, params)
    ref = layout.parameters(model)[0]
    device, dtype = ref.device, ref.dtype
    inputs, targets, batch_size = _gather(data, batch_size, device, dtype)
    num_samples = int(inputs.shape[0])
    if n is None:
        n = num_samples
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if nbeta is None:
        nbeta = default_nbeta(n)
    _check_positive("nbeta", nbeta)
    if init_loss_batches is not None and init_loss_batches < 1:
        raise ValueError(f"init_loss_batches must be >= 1 or None, got {init_loss_batches}")

    devices = [device.index or 0] if device.type == "cuda" else []
    # fork_rng: a model left in train mode with dropout would draw from the global stream.
    with torch.random.fork_rng(devices=devices), module_mode(model, eval_mode):
        floss = FunctionalLoss(model, loss_fn, layout)
        center = layout.flat_values(model)
        chunk = min(batch_size or num_samples, num_samples)
        # A given L_n(w*) still needs σ_B for the runaway rule; a few chunks estimate it.
        max_chunks = init_loss_batches if init_loss is None else min(init_loss_batches or 32, 32)
        computed_init, sigma_b = _init_loss(floss, center, inputs, targets, chunk, max_chunks)
        if init_loss is None:
            init_loss = computed_init
        if not math.isfinite(init_loss):
            raise ValueError(f"L_n(w*) is not finite ({init_loss}); cannot estimate the LLC")
        traces = run_sgld_chains(
            floss,
            center,
            inputs,
            targets,
            chain_ids=ids,
            num_steps=num_burnin + num_draws,
            step_size=float(step_size),
            localization=float(localization),
            nbeta=float(nbeta),
            batch_size=batch_size,
            seed=seed,
            vectorize=vectorize,
        )
    losses = traces.losses.numpy()
    threshold = divergence_threshold(
        init_loss,
        dim=layout.dim,
        nbeta=nbeta,
        minibatch_loss_std=sigma_b,
        runaway_factor=runaway_factor,
    )
    return LLCEstimate.from_traces(
        loss_trace=losses[:, num_burnin:],
        burnin_trace=losses[:, :num_burnin],
        chain_indices=ids,
        init_loss=init_loss,
        nbeta=nbeta,
        n=n,
        threshold=threshold,
        num_grad_evals=traces.num_grad_evals,
        seconds=time.perf_counter() - start_time,
        step_size=step_size,
        localization=localization,
        batch_size=batch_size if batch_size is not None and batch_size < num_samples else None,
        dim=layout.dim,
        vectorized=traces.vectorized,
        seed=seed,
        warn=warn,
    )
