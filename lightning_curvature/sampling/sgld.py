"""SGLD chains on the localized tempered posterior, advanced all at once or one by one.

The target is (Lau et al. 2023, "The local learning coefficient", eq. 8)

    p(w) ∝ exp(−nβ·L_n(w) − (γ/2)·‖w − w*‖²)

and the sampler is stochastic-gradient Langevin dynamics (Welling & Teh 2011) with a minibatch
``B_t`` of the data at every step,

    w_{t+1} = w_t − (ε/2)·(nβ·∇L_B_t(w_t) + γ·(w_t − w*)) + N(0, ε·I),   w_0 = w*.

Randomness: chain ``c`` (a *global* chain id) owns two ``torch.Generator`` s seeded from
``(seed, c)`` through ``numpy.random.SeedSequence`` — one on the CPU for its minibatch order, one
on the parameters' device for its Gaussian noise. A chain's trajectory therefore depends only on
``(seed, c)``, never on which other chains run next to it, in which process, or whether the chains
are advanced together (``vmap``) or one after the other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ..curvature.functional import FunctionalLoss, call_module

__all__ = ["ChainTraces", "chain_generators", "minibatch_indices", "run_sgld_chains"]

_DATA_STREAM = 0
_NOISE_STREAM = 1


def _stream_seed(seed: int, chain_id: int, stream: int) -> int:
    # SeedSequence mixes the words well, so neighbouring chain ids give unrelated streams, and it
    # never touches numpy's global RNG.
    state = np.random.SeedSequence([int(seed), int(chain_id), stream]).generate_state(2, np.uint32)
    return int(state[0]) | (int(state[1]) & 0x7FFFFFFF) << 32


def chain_generators(
    seed: int, chain_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Generator, torch.Generator]:
    """The ``(data, noise)`` generators of global chain ``chain_id``.

    The data generator lives on the CPU (so minibatch orders are the same on every device); the
    noise generator lives on ``device``.
    """
    data_gen = torch.Generator(device="cpu")
    data_gen.manual_seed(_stream_seed(seed, chain_id, _DATA_STREAM))
    noise_gen = torch.Generator(device=device)
    noise_gen.manual_seed(_stream_seed(seed, chain_id, _NOISE_STREAM))
    return data_gen, noise_gen


def minibatch_indices(
    num_samples: int, batch_size: int, num_steps: int, generator: torch.Generator
) -> Tensor:
    """Sample indices for ``num_steps`` minibatches, shape ``(num_steps, batch_size)``.

    Epochs without replacement, like a shuffled ``DataLoader``: the stream is a concatenation of
    random permutations of ``range(num_samples)``, cut into consecutive chunks of ``batch_size``
    (a chunk may straddle two epochs, so every minibatch has exactly ``batch_size`` samples).
    """
    total = num_steps * batch_size
    perms = [
        torch.randperm(num_samples, generator=generator)
        for _ in range(math.ceil(total / num_samples))
    ]
    return torch.cat(perms)[:total].reshape(num_steps, batch_size)


@dataclass(frozen=True)
class ChainTraces:
    """Raw output of :func:`run_sgld_chains`.

    Attributes
    ----------
    losses : Tensor
        ``(chains, steps)`` float64 on the CPU: the minibatch loss ``L_B_t(w_t)`` at every step,
        evaluated at the parameters *before* the update of step ``t`` (so column 0 is at w*).
    chain_ids : list of int
        Global chain ids, one per row.
    vectorized : bool
        Whether the chains were advanced together with ``vmap``.
    num_grad_evals : int
        Minibatch gradient evaluations (chains × steps).
    nan_gradient_step : Tensor
        ``(chains,)`` int64 on the CPU: the first step at which a chain's gradient had a
        non-finite entry while its loss was finite (``-1``: never). Such a chain carries NaN
        parameters afterwards, so its later losses are NaN too; this records the real cause.
    """

    losses: Tensor
    chain_ids: list[int]
    vectorized: bool
    num_grad_evals: int
    nan_gradient_step: Tensor


#: Gaussian noise is drawn in blocks of about this many numbers per chain, so that many small
#: chains do not pay one generator call per chain per step.
_NOISE_BLOCK_NUMEL = 1 << 18


class _NoiseStream:
    """Per-chain N(0, I) noise, drawn in blocks of ``k`` steps from each chain's generator.

    The sequential and vectorized paths use the same block length, so a chain sees the same
    numbers on both.
    """

    def __init__(self, gens: list[torch.Generator], dim: int, num_steps: int, like: Tensor) -> None:
        self.gens, self.dim = gens, dim
        self.k = max(1, min(num_steps, _NOISE_BLOCK_NUMEL // max(dim, 1)))
        self.block = torch.empty(len(gens), self.k, dim, dtype=like.dtype, device=like.device)
        self.pos = self.k

    def next(self) -> Tensor:
        """Noise for the next step, shape ``(chains, dim)`` (a view valid until the next call)."""
        if self.pos == self.k:
            for c, g in enumerate(self.gens):
                torch.randn(self.k, self.dim, generator=g, out=self.block[c])
            self.pos = 0
        out = self.block[:, self.pos]
        self.pos += 1
        return out


class _NanGradientSteps:
    """First step with a non-finite gradient at a finite loss, per chain, kept on the device.

    The check is two reductions over the gradients per step (``amax`` and ``amin``: both
    propagate NaN and carry ±inf, so both are finite exactly when every entry is; unlike
    ``isfinite(g).all()`` they write no elementwise boolean tensor, which cost as much as a
    third of the gradient itself on an MLP) and never synchronizes with the device (the result
    is read once, at the end).
    """

    def __init__(self, num_chains: int, device: torch.device) -> None:
        self.first = torch.full((num_chains,), -1, dtype=torch.int64, device=device)

    def record(self, t: int, grads: Tensor, losses: Tensor) -> None:
        """Step ``t`` of flat gradients ``(chains, dim)``."""
        self.record_parts(t, [grads], losses)

    def record_parts(self, t: int, grads: list[Tensor], losses: Tensor) -> None:
        """Step ``t`` of per-parameter gradients ``(chains, *shape)`` (no flat copy)."""
        flat = [g.reshape(g.shape[0], -1) for g in grads]
        top = torch.stack([g.amax(dim=1) for g in flat]).amax(dim=0)
        low = torch.stack([g.amin(dim=1) for g in flat]).amin(dim=0)
        finite = torch.isfinite(top) & torch.isfinite(low)
        bad = torch.isfinite(losses) & ~finite
        self.first = torch.where(bad & (self.first < 0), t, self.first)

    def steps(self) -> Tensor:
        return self.first.cpu()


class _PartsUpdate:
    """The SGLD update applied parameter tensor by parameter tensor, on views of the flat state.

    The gradients arrive per parameter (``grad`` of the per-parameter dict); concatenating them
    into one flat vector at every step cost about a tenth of an SGLD step on a 2x256 MLP. The
    update is elementwise, so applying :func:`_sgld_update` to each slice gives exactly the flat
    result.
    """

    def __init__(self, layout: Any, theta: Tensor, center: Tensor) -> None:
        self.layout, self.names = layout, layout.names
        self.theta = list(layout.unflatten(theta).values())
        self.center = list(layout.unflatten(center).values())

    def grads(self, grads: dict[str, Tensor], chains: bool) -> list[Tensor]:
        """The gradients in layout order with a leading chain axis (added for one chain)."""
        out = [grads[n] for n in self.names]
        return out if chains else [g.unsqueeze(0) for g in out]

    def __call__(
        self, grads: list[Tensor], noise: Tensor, eps: float, gamma: float, nbeta: float
    ) -> None:
        noises = self.layout.unflatten(noise).values()
        for theta, g, xi, center in zip(self.theta, grads, noises, self.center, strict=True):
            # reshape: a single chain's gradients carry the chain axis of :meth:`grads`
            _sgld_update(theta, g.reshape(theta.shape), xi, center, eps, gamma, nbeta)


def _index(obj: Tensor, idx: Tensor | None) -> Tensor:
    return obj if idx is None else obj[idx]


def run_sgld_chains(
    floss: FunctionalLoss,
    center: Tensor,
    inputs: Tensor,
    targets: Tensor,
    *,
    chain_ids: Sequence[int],
    num_steps: int,
    step_size: float,
    localization: float,
    nbeta: float,
    batch_size: int | None,
    seed: int,
    vectorize: bool | None = None,
) -> ChainTraces:
    """Run SGLD chains from ``center`` (= w*) and record the minibatch loss of every step.

    Parameters
    ----------
    floss : FunctionalLoss
        The loss as a function of the flat parameter vector (module, loss_fn, layout).
    center : Tensor
        w*, flat, shape ``(dim,)``; also the localization center.
    inputs, targets : Tensor
        The whole data set, sample dimension first (indexed for minibatches).
    chain_ids : sequence of int
        Global chain ids to run (each seeds its own generators).
    num_steps : int
        SGLD steps per chain (burn-in and draws together).
    step_size, localization, nbeta : float
        ε, γ and nβ of the update.
    batch_size : int or None
        Minibatch size; ``None`` or ``>= n`` uses the full data at every step (no indexing).
    seed : int
        Base seed.
    vectorize : bool or None
        ``True``: ``vmap`` over chains (errors propagate); ``False``: one chain after the other;
        ``None``: try ``vmap`` and fall back to sequential chains with a warning if it fails.

    Returns
    -------
    ChainTraces
    """
    ids = [int(c) for c in chain_ids]
    num_samples = int(inputs.shape[0])
    full_batch = batch_size is None or batch_size >= num_samples
    if vectorize is False or len(ids) == 0:
        return _run_sequential(
            floss, center, inputs, targets, ids, num_steps, step_size, localization, nbeta,
            None if full_batch else batch_size, seed,
        )  # fmt: skip
    try:
        return _run_vectorized(
            floss, center, inputs, targets, ids, num_steps, step_size, localization, nbeta,
            None if full_batch else batch_size, seed,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - any vmap failure means "use the fallback"
        if vectorize is True:
            raise
        warnings.warn(
            f"vmap over SGLD chains failed ({type(err).__name__}: {err}); running the chains "
            "sequentially instead (same random streams, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return _run_sequential(
            floss, center, inputs, targets, ids, num_steps, step_size, localization, nbeta,
            None if full_batch else batch_size, seed,
        )  # fmt: skip


def _loss_of_params(
    floss: FunctionalLoss, center: Tensor
) -> Callable[[dict, Tensor, Tensor], Tensor]:
    # Gradients are taken with respect to the per-parameter dict (views of the flat state), not
    # the flat vector: differentiating through the slices would materialize one full-size zero
    # gradient per parameter tensor at every step.
    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        # floss.tensors supplies the snapshotted buffers / frozen parameters (fresh copies in
        # train mode); the sampled parameters replace the w* entries.
        tensors = {**floss.tensors(center), **params}
        return floss.loss_fn(call_module(floss.module, tensors, x), y)

    return loss


def _sgld_update(
    theta: Tensor,
    grad: Tensor,
    noise: Tensor,
    center: Tensor,
    eps: float,
    gamma: float,
    nbeta: float,
) -> None:
    """``w ← w − (ε/2)(nβ·g + γ(w − w*)) + √ε·ξ`` in place, in three passes over ``w``.

    The pull towards w* is a lerp, ``w + (εγ/2)(w* − w)``; then the gradient and the noise
    terms. Every term uses the ``w`` the gradient was taken at (the lerp reads each entry before
    writing it), as in the formula; no temporary is allocated.
    """
    if gamma != 0.0:
        theta.lerp_(center, 0.5 * eps * gamma)
    theta.add_(grad, alpha=-0.5 * eps * nbeta).add_(noise, alpha=math.sqrt(eps))


def _run_vectorized(
    floss, center, inputs, targets, ids, num_steps, eps, gamma, nbeta, batch_size, seed
) -> ChainTraces:
    layout = floss.layout
    num_chains, dim = len(ids), layout.dim
    gens = [chain_generators(seed, c, center.device) for c in ids]
    idx = None
    if batch_size is not None:
        # (steps, chains, batch): each chain its own minibatch order.
        idx = torch.stack(
            [minibatch_indices(inputs.shape[0], batch_size, num_steps, g[0]) for g in gens], dim=1
        ).to(inputs.device)
    data_dims = None if idx is None else 0
    step_fn = vmap(
        grad_and_value(_loss_of_params(floss, center)),
        in_dims=(0, data_dims, data_dims),
        randomness="error",
    )
    theta = center.detach().unsqueeze(0).repeat(num_chains, 1)
    noise = _NoiseStream([g[1] for g in gens], dim, num_steps, theta)
    losses = torch.empty(num_steps, num_chains, dtype=theta.dtype, device=theta.device)
    first_bad = _NanGradientSteps(num_chains, theta.device)
    update = _PartsUpdate(layout, theta, center)
    for t in range(num_steps):
        step_idx = None if idx is None else idx[t]
        grads, loss = step_fn(
            layout.unflatten(theta), _index(inputs, step_idx), _index(targets, step_idx)
        )
        losses[t] = loss.detach()
        parts = update.grads(grads, chains=True)
        first_bad.record_parts(t, parts, losses[t])
        update(parts, noise.next(), eps, gamma, nbeta)
    return ChainTraces(
        losses.T.to(device="cpu", dtype=torch.float64).contiguous(),
        ids,
        True,
        num_chains * num_steps,
        first_bad.steps(),
    )


def _run_sequential(
    floss, center, inputs, targets, ids, num_steps, eps, gamma, nbeta, batch_size, seed
) -> ChainTraces:
    layout = floss.layout
    step_fn = grad_and_value(_loss_of_params(floss, center))
    rows, bad_steps = [], []
    for c in ids:
        data_gen, noise_gen = chain_generators(seed, c, center.device)
        idx = None
        if batch_size is not None:
            idx = minibatch_indices(inputs.shape[0], batch_size, num_steps, data_gen).to(
                inputs.device
            )
        theta = center.detach().clone()
        noise = _NoiseStream([noise_gen], layout.dim, num_steps, theta)
        losses = torch.empty(num_steps, dtype=theta.dtype, device=theta.device)
        first_bad = _NanGradientSteps(1, theta.device)
        update = _PartsUpdate(layout, theta, center)
        for t in range(num_steps):
            step_idx = None if idx is None else idx[t]
            grads, loss = step_fn(
                layout.unflatten(theta), _index(inputs, step_idx), _index(targets, step_idx)
            )
            losses[t] = loss.detach()
            parts = update.grads(grads, chains=False)
            first_bad.record_parts(t, parts, losses[t : t + 1])
            update(parts, noise.next()[0], eps, gamma, nbeta)
        rows.append(losses)
        bad_steps.append(first_bad.steps())
    traces = (torch.stack(rows) if rows else torch.empty(0, num_steps, dtype=center.dtype)).to(
        device="cpu", dtype=torch.float64
    )
    steps = torch.cat(bad_steps) if bad_steps else torch.empty(0, dtype=torch.int64)
    return ChainTraces(traces, ids, False, len(ids) * num_steps, steps)
