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
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_bool, check_float, check_index_list, check_int, check_seed
from ..curvature.batches import BatchSet, as_batch_set
from ..curvature.functional import FunctionalLoss, LossFn, module_mode
from ..curvature.params import ParameterLayout
from .diagnostics import divergence_threshold
from .result import (
    DRIFT_TOLERANCE,
    GEWEKE_THRESHOLD,
    R_HAT_THRESHOLD,
    LLCCost,
    LLCEstimate,
    LLCTraces,
    SGLDSettings,
    default_nbeta,
)
from .sgld import run_sgld_chains

__all__ = [
    "DRIFT_TOLERANCE",
    "GEWEKE_THRESHOLD",
    "LLCEstimate",
    "R_HAT_THRESHOLD",
    "default_nbeta",
    "estimate_llc",
]


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
        Emit ``RuntimeWarning`` s for excluded or unconverged chains and for a w* that is not a
        minimum, one per problem (they are always recorded in ``LLCEstimate.warnings``).

    Returns
    -------
    LLCEstimate
        Read ``converged`` (the chains mixed) and ``at_minimum`` (w* is a local minimum: λ̂ is
        not significantly negative and no chain slid below L_n(w*); rules in
        :mod:`~lightning_curvature.sampling.result`) before reading ``llc_mean``.
    """
    start_time = time.perf_counter()
    args = _checked_arguments(locals())
    ids = args["chain_indices"]
    step_size, localization, seed = args["step_size"], args["localization"], args["seed"]

    layout = ParameterLayout.from_module(model, params)
    ref = layout.parameters(model)[0]
    device, dtype = ref.device, ref.dtype
    inputs, targets, batch_size = _gather(data, args["batch_size"], device, dtype)
    num_samples = int(inputs.shape[0])
    n = check_int("n", num_samples if n is None else n, minimum=2)
    nbeta = default_nbeta(n) if nbeta is None else nbeta

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
        chains = run_sgld_chains(
            floss,
            center,
            inputs,
            targets,
            chain_ids=ids,
            num_steps=num_burnin + num_draws,
            step_size=step_size,
            localization=localization,
            nbeta=nbeta,
            batch_size=batch_size,
            seed=seed,
            vectorize=vectorize,
        )
    losses = chains.losses.numpy()
    settings = SGLDSettings(
        step_size=step_size,
        localization=localization,
        nbeta=float(nbeta),
        n=n,
        batch_size=batch_size if batch_size is not None and batch_size < num_samples else None,
        dim=layout.dim,
        seed=seed,
        divergence_threshold=divergence_threshold(
            init_loss,
            dim=layout.dim,
            nbeta=nbeta,
            minibatch_loss_std=sigma_b,
            runaway_factor=runaway_factor,
        ),
    )
    traces = LLCTraces.of(
        losses[:, num_burnin:], losses[:, :num_burnin], ids, chains.nan_gradient_step.numpy()
    )
    cost = LLCCost(
        num_grad_evals=chains.num_grad_evals,
        seconds=time.perf_counter() - start_time,
        vectorized=chains.vectorized,
    )
    return LLCEstimate.from_traces(
        traces, settings, init_loss=float(init_loss), cost=cost, warn=warn
    )


def _checked_arguments(given: dict) -> dict:
    """Validate every scalar argument of :func:`estimate_llc` (``checks``; fails at the call)."""
    num_chains = check_int("num_chains", given["num_chains"], minimum=1)
    check_int("num_draws", given["num_draws"], minimum=1)
    check_int("num_burnin", given["num_burnin"], minimum=0)
    check_int("n", given["n"], minimum=2, allow_none=True)
    check_float("nbeta", given["nbeta"], low=0.0, low_open=True, allow_none=True)
    check_float("init_loss", given["init_loss"], allow_none=True)
    check_int("init_loss_batches", given["init_loss_batches"], minimum=1, allow_none=True)
    check_float("runaway_factor", given["runaway_factor"], low=0.0, low_open=True)
    check_bool("eval_mode", given["eval_mode"], allow_none=True)
    check_bool("vectorize", given["vectorize"], allow_none=True)
    check_bool("warn", given["warn"])
    ids = given["chain_indices"]
    if ids is None:
        ids = list(range(num_chains))
    else:
        ids = check_index_list("chain_indices", ids, minimum=0, maximum=num_chains - 1)
    return {
        "step_size": check_float("step_size", given["step_size"], low=0.0, low_open=True),
        "localization": check_float("localization", given["localization"], low=0.0),
        "batch_size": check_int("batch_size", given["batch_size"], minimum=1, allow_none=True),
        "seed": check_seed("seed", given["seed"]),
        "chain_indices": ids,
    }
