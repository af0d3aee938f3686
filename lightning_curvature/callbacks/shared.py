"""Measure once, share everything: one measurement set, one Hessian, one Lanczos run per epoch.

Every curvature callback on a Trainer finds the same :class:`MeasurementStore` (one per Trainer).
Callbacks whose measurement sets agree (same ``num_samples``, ``seed``, ``batch_size``, DDP
sharding, ``eval_mode`` and loss function: a :class:`SetKey`) share, at each epoch, one
:class:`EpochMeasurement`:

- the measurement set itself (gathered once, in the model's dtype) and the loss at ``w*`` on it;
- one :class:`~lightning_curvature.curvature.HessianOperator` (its kept double-backward graph or
  linearization serves every product of the epoch, whoever asks);
- one warm-started Lanczos run (:meth:`EpochMeasurement.krylov`) whose Ritz pairs are
  ``curvature/lambda_max``/``lambda_min`` *and* the Hessian directions of ``LossProjection``,
  and whose basis deflates the trace estimate of ``HessianTrace``.

So every scalar and figure of one epoch describes the same Hessian. The defaults of the curvature
callbacks share one key (256 samples, seed 0); a callback with a different key (e.g. a second
instance with more samples) gets its own measurement, and a callback used alone works unchanged.

The Lanczos budget of the shared run is the largest any registered consumer asked for, and its
start vector is last measurement's ``(v_max, v_min)`` (the warm start lives here, once, and each
consumer checkpoints it). Its generator depends only on ``(seed, epoch)``, not on which callback
happens to ask first, so the numbers do not depend on the order of the callbacks.

Adding a quantity that reuses this work (e.g. a per-layer trace, or ``llc/not_minimum`` from
``lambda_min``) means one more lazily cached method here and a callback that calls it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curvature import curvature
from lightning_curvature.curvature import BatchSet, ExtremeEigenpairs, LanczosResult

from .distributed import DistributedInfo
from .measurement_set import derive_seed

__all__ = ["EpochMeasurement", "KrylovRun", "MeasurementStore", "SetKey"]

#: Salt of the shared Lanczos run's generator.
_KRYLOV_SALT = 0x4B52
#: Relative norm of the random part mixed into a warm start (an exact invariant subspace would
#: end the iteration with only the warm-start eigenpairs).
WARM_START_NOISE = 0.1


@dataclass(frozen=True)
class SetKey:
    """What makes two callbacks' measurements identical (they then share one)."""

    num_samples: int | None
    seed: int
    batch_size: int | None
    sharded: bool
    eval_mode: bool
    loss_id: int


@dataclass(frozen=True)
class KrylovRun:
    """One Lanczos run on the epoch's Hessian and what is read from it.

    Attributes
    ----------
    lanczos : LanczosResult
        ``Q_k`` (basis, operator dtype) and ``T_k = Q_kᵀ H Q_k``.
    eigenpairs : ExtremeEigenpairs
        Ritz pairs of the extreme eigenvalues with residuals from explicit products.
    seconds : float
        Wall time (Lanczos and the two residual products).
    """

    lanczos: LanczosResult
    eigenpairs: ExtremeEigenpairs
    seconds: float


@dataclass
class EpochMeasurement:
    """What every callback sharing a :class:`SetKey` measures at one epoch (built lazily)."""

    key: SetKey
    step: int
    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    data: BatchSet
    dist: DistributedInfo
    center_loss: float
    store: MeasurementStore
    gradient_finite: bool = True
    seconds: dict[str, float] = field(default_factory=dict)
    _hessian: Any = None
    _krylov: KrylovRun | None = None

    @property
    def eval_mode(self) -> bool:
        return self.key.eval_mode

    def hessian(self) -> curvature.HessianOperator:
        """The epoch's Hessian operator (built on first use; its graph serves every product)."""
        if self._hessian is None:
            start = time.perf_counter()
            self._hessian = curvature.HessianOperator(
                self.model,
                self.loss_fn,
                self.data,
                eval_mode=self.eval_mode,
                reduce_fn=self.dist.reduce_fn,
                # A fixed route: the two routes round differently, and a timing-based choice
                # would make logged values depend on the process's history (the loop was the
                # faster route at every block size measured on CPU, docs/benchmarks.md).
                vectorize_matmat=False,
            )
            self.seconds["hessian"] = time.perf_counter() - start
        return self._hessian

    def krylov(self, wrap: Callable[[Any], Any] | None = None) -> KrylovRun:
        """The epoch's warm-started Lanczos run (``store.krylov_iters(key)`` steps).

        ``wrap`` lets the caller count products (progress bar) on the first, computing call.
        """
        if self._krylov is None:
            op = self.hessian()
            counted = wrap(op) if wrap is not None else op
            start = time.perf_counter()
            iters, tol = self.store.krylov_budget(self.key)
            g = torch.Generator(device=op.device)
            g.manual_seed(derive_seed(self.key.seed, self.step, _KRYLOV_SALT))
            v0 = self._start_vector(op, g)
            run = curvature.lanczos(counted, iters, v0=v0, generator=g, keep_basis=True)
            pairs = curvature.extreme_ritz_pairs(counted, run, tol)
            if torch.isfinite(pairs.v_max).all() and torch.isfinite(pairs.v_min).all():
                self.store.warm_starts[self.key] = (
                    pairs.v_max.detach().cpu(),
                    pairs.v_min.detach().cpu(),
                )
            seconds = time.perf_counter() - start
            self.seconds["lanczos"] = seconds
            self._krylov = KrylovRun(run, pairs, seconds)
        return self._krylov

    def _start_vector(self, op: Any, g: torch.Generator) -> Tensor | None:
        warm = self.store.warm_starts.get(self.key)
        if warm is None or any(v.numel() != op.dim for v in warm):
            return None
        v = sum(w.to(device=op.device, dtype=torch.float64) for w in warm)
        assert isinstance(v, Tensor)
        if not torch.isfinite(v).all() or float(v.norm()) == 0.0:
            return None
        noise = torch.randn(op.dim, generator=g, device=op.device, dtype=torch.float64)
        v = v / v.norm() + WARM_START_NOISE * noise / noise.norm()
        return v.to(op.dtype)


class MeasurementStore:
    """The per-Trainer registry of shared measurements (see the module docstring).

    Only the current epoch's measurements are kept (a new step drops the old ones), so the
    memory held is one Hessian graph and one Lanczos basis per :class:`SetKey`.
    """

    _stores: weakref.WeakKeyDictionary[Any, MeasurementStore] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self._budgets: dict[SetKey, dict[int, tuple[int, float]]] = {}
        self._epochs: dict[SetKey, EpochMeasurement] = {}
        self.warm_starts: dict[SetKey, tuple[Tensor, Tensor]] = {}

    @classmethod
    def of(cls, trainer: Any) -> MeasurementStore:
        """The store of ``trainer`` (created on first use)."""
        try:
            store = cls._stores.get(trainer)
        except TypeError:  # an object that cannot be weakly referenced (a test double)
            return cls()
        if store is None:
            store = cls()
            cls._stores[trainer] = store
        return store

    def register(self, key: SetKey, consumer: object, *, krylov_iters: int, tol: float) -> None:
        """``consumer`` reads the shared Lanczos run of ``key`` with at least this budget."""
        self._budgets.setdefault(key, {})[id(consumer)] = (krylov_iters, tol)

    def krylov_budget(self, key: SetKey) -> tuple[int, float]:
        """Largest registered Lanczos budget and smallest tolerance (default 20, 1e-3)."""
        wants = list(self._budgets.get(key, {}).values())
        if not wants:
            return 20, 1e-3
        return max(w[0] for w in wants), min(w[1] for w in wants)

    def epoch(
        self, key: SetKey, step: int, build: Callable[[], EpochMeasurement]
    ) -> EpochMeasurement:
        """The shared measurement of ``key`` at ``step`` (``build()`` on the first request)."""
        current = self._epochs.get(key)
        if current is None or current.step != step:
            current = build()
            self._epochs[key] = current
        return current

    def measurements(self, step: int) -> list[EpochMeasurement]:
        """Every shared measurement taken at ``step`` so far (e.g. for a tag that combines the
        LLC's set with the curvature set's ``λ_min``)."""
        return [m for m in self._epochs.values() if m.step == step]

    def release(self, step: int | None = None) -> None:
        """Drop measurements (all, or those not at ``step``) and the memory they hold."""
        self._epochs = {
            k: m for k, m in self._epochs.items() if step is not None and m.step == step
        }

    def set_warm_start(self, key: SetKey, vectors: tuple[Tensor, Tensor] | None) -> None:
        """Restore a checkpointed warm start (a finite pair of flat vectors)."""
        if vectors is None:
            return
        v_max, v_min = vectors
        if all(isinstance(v, Tensor) and bool(torch.isfinite(v).all()) for v in vectors):
            self.warm_starts[key] = (v_max.detach().cpu(), v_min.detach().cpu())
