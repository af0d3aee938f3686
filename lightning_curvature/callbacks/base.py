"""``CurvatureCallback``: everything the measuring callbacks share.

A subclass only says what to measure: it implements :meth:`CurvatureCallback.measure`, which gets a
:class:`MeasurementContext` (model, loss, measurement data, per-epoch generator, ``reduce_fn`` and
the epoch's shared :class:`~.shared.EpochMeasurement`) and returns a :class:`Measurement` (scalars
by tag, figure factories, images, histograms). The base class owns the rest of the contract in
``docs/architecture.md``:

- shared keyword arguments, validated at construction (:mod:`lightning_curvature.checks`);
- the loss function, resolved at ``setup`` (``loss_fn=``, else ``pl_module.loss_fn``, else
  ``pl_module.criterion``, else an error that says how to provide one) and dry-run on a few
  measurement samples before training starts (:mod:`.contract`): a sum-reduced, non-scalar,
  non-finite or non-differentiable loss, a loss class instead of an instance, or a model output
  the loss cannot take stops ``fit`` there, with the fix in the message;
- budgets that cannot fit in memory are refused at the same point (:meth:`memory_bytes`);
- the measurement set, drawn once from the training dataset with the callback's own generator
  and kept in ``state_dict()``; under DDP each rank measures its shard; callbacks with the same
  set share one measurement per epoch (:mod:`.shared`);
- scheduling: after each ``every_n_epochs``-th training epoch (``on_train_epoch_end``, i.e. after
  that epoch's validation), never during the sanity check, optionally once before training;
- per-measurement generators derived from ``(seed, epoch)``;
- the side-effect guard (:func:`~lightning_curvature.callbacks.guard.measurement_context`);
- a failure while training (a non-finite loss or estimate, an exception in the engine): a warning
  and the callback's tags skipped for that epoch, never a crash, never a NaN in the logs;
- tags: ``name=`` makes a second instance of a callback distinct (its tags get ``/<name>``
  appended and its ``state_key`` differs); two instances that would write the same tags are
  refused at setup;
- ``time/<CallbackName>`` and logging through :class:`~.sink.MetricSink` (x-axis = number of
  completed epochs; 0 = before training).
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_curvature.checks import ArgumentError, check_bool, check_int, check_seed
from lightning_curvature.curvature import BatchSet, FunctionalLoss, module_mode
from lightning_curvature.curvature.functional import LossFn

from .contract import check_loss_contract, check_loss_fn_object
from .distributed import DistributedInfo
from .guard import measurement_context
from .measurement_set import derive_seed, draw_indices, gather_samples, training_dataset
from .progress import MeasurementProgress
from .shared import EpochMeasurement, MeasurementStore, SetKey
from .sink import MetricSink

__all__ = ["CurvatureCallback", "Measurement", "MeasurementContext", "MeasurementError"]

#: Refuse a budget whose working memory exceeds this many bytes (see ``memory_bytes``).
MEMORY_LIMIT_BYTES = 16 * 1024**3
#: Samples of the per-epoch finite-gradient check.
GRADIENT_CHECK_SAMPLES = 64


class MeasurementError(ValueError):
    """A callback's configuration cannot work with this model or data (raised at setup)."""


# -- what a measurement gets and returns ----------------------------------------------------
@dataclass
class MeasurementContext:
    """Inputs of one measurement.

    Attributes
    ----------
    trainer, pl_module :
        The Lightning objects (``pl_module`` is the model the engine differentiates: the
        LightningModule, or a full-precision copy of it under ``"*-true"`` half precision).
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar mean loss``.
    data : BatchSet
        This rank's part of the measurement set (the whole set if the callback does not shard),
        in the model's dtype.
    generator : torch.Generator
        Fresh for this measurement, seeded from ``(seed, epoch, callback)``.
    step : int
        Completed training epochs (0 = before training): the x-axis of every logged value.
    dist : DistributedInfo
        Rank, world size and the ``reduce_fn`` to pass to the engine.
    eval_mode : bool
        Measure in eval mode (``True``) or train mode (``False``).
    center_loss : float
        Loss at the current weights on the whole measurement set (already checked finite).
    dataset_size : int
        Size of the training dataset (``n`` for the LLC).
    name : str
        The callback's display name (warnings, progress bars).
    shared : EpochMeasurement
        This epoch's measurement shared with every callback on the same measurement set: the
        Hessian operator and the Lanczos run (:mod:`.shared`).
    """

    trainer: Any
    pl_module: nn.Module
    loss_fn: LossFn
    data: BatchSet
    generator: torch.Generator
    step: int
    dist: DistributedInfo
    eval_mode: bool
    center_loss: float
    dataset_size: int
    name: str
    shared: EpochMeasurement

    @property
    def reduce_fn(self) -> Callable[[Tensor], Tensor] | None:
        return self.dist.reduce_fn

    @property
    def is_global_zero(self) -> bool:
        return self.dist.is_global_zero

    def progress(self, what: str, total: int | None) -> MeasurementProgress:
        """A transient progress bar ``"<Callback>: <what>"`` (silent without a progress bar)."""
        return MeasurementProgress(self.trainer, f"{self.name}: {what}", total)

    def artifact_dir(self, subdir: str) -> str | None:
        """A folder beside the event files (rank zero only; ``None`` elsewhere)."""
        return MetricSink(self.trainer, self.pl_module, self.step).artifact_dir(subdir)


@dataclass
class Measurement:
    """What a measurement logs. Non-finite scalars are dropped (with a warning) by the base class.

    ``figures`` hold zero-argument factories so figures are only drawn on rank zero.
    ``histograms`` map a tag to ``(bucket_right_edges, bucket_counts)``.
    ``shared_seconds`` is the wall time of shared work (:mod:`.shared`) this measurement happened
    to compute first (benchmarks amortize it over every consumer).
    """

    scalars: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Callable[[], Any]] = field(default_factory=dict)
    images: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    shared_seconds: dict[str, float] = field(default_factory=dict)


# -- the base callback ------------------------------------------------------------------------
class CurvatureCallback(Callback):
    """Base class of the measuring callbacks (see the module docstring for the contract).

    Parameters
    ----------
    num_samples : int or None
        Size of the measurement set drawn from the training dataset (None = all of it). Sets
        drawn with the same ``seed`` are nested: the first ``k`` indices of one permutation.
    batch_size : int or None
        Samples per forward pass over the measurement set (memory/speed trade-off only: results
        do not depend on it). None = one pass over the whole set.
    every_n_epochs : int
        Measure after every ``every_n_epochs``-th training epoch.
    seed : int
        Seeds the measurement-set draw and, with the epoch, every random probe.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets) -> scalar mean loss`` with ``outputs = pl_module(inputs)``
        (the LightningModule's ``forward``); default ``pl_module.loss_fn`` or
        ``pl_module.criterion``. An instance (``nn.CrossEntropyLoss()``), not the class.
    eval_mode : bool
        Measure with the model in eval mode (no dropout, BatchNorm running statistics).
    measure_on_train_start : bool
        Also measure once before the first training step (logged at epoch 0).
    name : str, optional
        Distinguishes a second instance of the same callback: its tags become ``<tag>/<name>``,
        its time tag ``time/<Class>/<name>``, and its ``state_key`` differs.
    """

    #: Whether each DDP rank measures only its shard of the measurement set (False: every rank
    #: uses the whole set, e.g. for LLC chains split across ranks).
    shard_measurement_set: ClassVar[bool] = True

    def __init__(
        self,
        *,
        num_samples: int | None = 256,
        batch_size: int | None = 256,
        every_n_epochs: int = 1,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        eval_mode: bool = True,
        measure_on_train_start: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.num_samples = check_int("num_samples", num_samples, minimum=1, allow_none=True)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
        self.every_n_epochs: int = check_int("every_n_epochs", every_n_epochs, minimum=1)  # type: ignore[assignment]
        self.seed = check_seed("seed", seed)
        if loss_fn is not None:
            try:
                check_loss_fn_object(loss_fn, type(self).__name__)
            except ValueError as err:
                raise ArgumentError(str(err)) from None
        self.eval_mode: bool = check_bool("eval_mode", eval_mode)  # type: ignore[assignment]
        self.measure_on_train_start: bool = check_bool(  # type: ignore[assignment]
            "measure_on_train_start", measure_on_train_start
        )
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise ArgumentError(
                f"`name` must be a non-empty string without '/' or None, got {name!r}"
            )
        self.label = name
        self.loss_fn = loss_fn
        self._resolved_loss_fn: LossFn | None = None
        self._indices: Tensor | None = None
        self._dataset_size: int | None = None
        self._data: BatchSet | None = None
        self._data_key: tuple | None = None
        self._store: MeasurementStore | None = None
        self._checked = False
        self.last_measurement: Measurement | None = None

    # -- identity ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Used in warnings and progress bars: the class name, plus ``[name]`` if given."""
        base = type(self).__name__
        return base if self.label is None else f"{base}[{self.label}]"

    def tag(self, tag: str) -> str:
        """The logged tag of ``tag``: unchanged, or ``<tag>/<name>`` for a named instance."""
        return tag if self.label is None else f"{tag}/{self.label}"

    @property
    def time_tag(self) -> str:
        return self.tag(f"time/{type(self).__name__}")

    @property
    @override
    def state_key(self) -> str:
        keys: dict[str, Any] = {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "every_n_epochs": self.every_n_epochs,
        }
        if self.label is not None:
            keys["name"] = self.label
        return self._generate_state_key(**keys)

    # -- to implement ------------------------------------------------------------------------
    def measure(self, ctx: MeasurementContext) -> Measurement:
        """Call the engine and return what to log. Runs inside the side-effect guard."""
        raise NotImplementedError

    def gather_batch_size(self) -> int | None:
        """Chunk size of the gathered measurement set (``batch_size`` unless a subclass differs)."""
        return self.batch_size

    def extra_state(self) -> dict[str, Any]:
        """Subclass state to checkpoint (directions, warm-start vectors...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def memory_bytes(self, dim: int, num_samples: int) -> int:
        """Working memory of one measurement for ``dim`` parameters (refused above the limit)."""
        return 0

    def register_shared(self, store: MeasurementStore, key: SetKey) -> None:
        """Tell the store which shared work this callback reads (e.g. a Lanczos budget)."""

    # -- Lightning hooks ---------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._resolved_loss_fn = self.resolve_loss_fn(pl_module)
        self._check_unique_tags(trainer)
        self._store = MeasurementStore.of(trainer)
        self.register_shared(self._store, self.set_key(self._resolved_loss_fn))
        self._checked = False

    def resolve_loss_fn(self, pl_module: Any) -> LossFn:
        """``loss_fn=``, else ``pl_module.loss_fn``, else ``pl_module.criterion``."""
        if self.loss_fn is not None:
            return self.loss_fn
        for attr in ("loss_fn", "criterion"):
            candidate = getattr(pl_module, attr, None)
            if isinstance(candidate, type):
                check_loss_fn_object(candidate, f"{self.name} (pl_module.{attr})")
            if callable(candidate):
                return candidate
        raise MeasurementError(
            f"{self.name} needs the training loss as loss_fn(outputs, targets) -> scalar mean "
            f"loss, but {type(pl_module).__name__} has no callable `loss_fn` or `criterion` "
            f"attribute. Either pass it to the callback, e.g. "
            f"{type(self).__name__}(loss_fn=torch.nn.CrossEntropyLoss()), or set "
            f"`self.loss_fn = torch.nn.CrossEntropyLoss()` in your LightningModule's __init__."
        )

    def _check_unique_tags(self, trainer: Any) -> None:
        for other in getattr(trainer, "callbacks", []) or []:
            if other is self or type(other) is not type(self):
                continue
            if getattr(other, "label", None) == self.label:
                raise MeasurementError(
                    f"two {type(self).__name__} callbacks would write the same tags "
                    f"({self.tag('...')}); give each a distinct name=, e.g. "
                    f"{type(self).__name__}(..., name='train_mode')"
                )

    def set_key(self, loss_fn: LossFn) -> SetKey:
        """What this callback's measurement shares with others (:class:`~.shared.SetKey`)."""
        return SetKey(
            num_samples=self.num_samples,
            seed=self.seed,
            batch_size=self.gather_batch_size(),
            sharded=self.shard_measurement_set,
            eval_mode=self.eval_mode,
            loss_id=id(loss_fn),
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with measurement_context(pl_module):
            data = self._ensure_measurement_set(trainer, pl_module)
            self._check_setup(pl_module, data)
        resumed = trainer.current_epoch > 0 or trainer.global_step > 0
        if self.measure_on_train_start and not resumed:
            self._run(trainer, pl_module, step=0)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last measurement's graph and Lanczos basis are not needed while training.
        if self._store is not None:
            self._store.release()

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._store is not None:
            self._store.release()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        step = trainer.current_epoch + 1
        if step % self.every_n_epochs == 0:
            self._run(trainer, pl_module, step=step)

    # -- checkpointing -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "indices": None if self._indices is None else self._indices.clone(),
            "dataset_size": self._dataset_size,
            "extra": self.extra_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        indices = state_dict.get("indices")
        self._indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self._dataset_size = state_dict.get("dataset_size")
        self._data, self._data_key = None, None
        self.load_extra_state(state_dict.get("extra", {}) or {})

    # -- internals ---------------------------------------------------------------------------
    def generator(self, step: int, device: torch.device) -> torch.Generator:
        """The measurement generator for epoch ``step``: a pure function of (seed, step, class)."""
        salt = zlib.crc32(type(self).__name__.encode())
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(self.seed, step, salt))
        return g

    def _check_setup(self, pl_module: nn.Module, data: BatchSet) -> None:
        """Before the first step: the loss contract and the memory budget (errors stop fit)."""
        if self._checked:
            return
        loss_fn = self._resolved_loss_fn or self.resolve_loss_fn(pl_module)
        model = _measurement_model(pl_module)
        with module_mode(model, self.eval_mode):
            check_loss_contract(model, loss_fn, data, self.name)
        dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
        need = self.memory_bytes(dim, data.num_samples)
        if need > MEMORY_LIMIT_BYTES:
            raise MeasurementError(
                f"{self.name}: this budget needs about {need / 1024**3:.3g} GiB of working memory "
                f"for {dim} parameters (limit {MEMORY_LIMIT_BYTES / 1024**3:.0f} GiB); lower it"
            )
        self._checked = True

    def _ensure_measurement_set(self, trainer: Any, pl_module: Any) -> BatchSet:
        dataset = training_dataset(trainer)
        size = len(dataset)
        if self._indices is None:
            self._indices = draw_indices(size, self.num_samples, self.seed)
            self._dataset_size = size
        elif self._dataset_size is not None and self._dataset_size != size:
            raise MeasurementError(
                f"{self.name}: the checkpointed measurement set was drawn from a training set "
                f"of {self._dataset_size} samples, but the training set now has {size}"
            )
        dist = DistributedInfo.from_trainer(trainer)
        device, dtype = _module_device(pl_module), _measurement_dtype(pl_module)
        key = (id(dataset), dist.rank, dist.world_size, str(device), dtype)
        if self._data is None or self._data_key != key:
            indices = dist.shard(self._indices) if self.shard_measurement_set else self._indices
            if len(indices) == 0:
                raise MeasurementError(
                    f"{self.name}: num_samples={len(self._indices)} is smaller than the number of "
                    f"processes ({dist.world_size}); every rank needs at least one sample"
                )
            self._data = gather_samples(
                dataset, indices, batch_size=self.gather_batch_size(), device=device, dtype=dtype
            )
            self._data_key = key
        return self._data

    def _center_loss(
        self, model: nn.Module, loss_fn: LossFn, data: BatchSet, dist: DistributedInfo
    ) -> float:
        functional = FunctionalLoss(model, loss_fn)
        theta = functional.layout.flat_values(model)
        with torch.no_grad(), module_mode(model, self.eval_mode):
            local = functional.mean_loss(theta, data).detach().to(torch.float64)
        if self.shard_measurement_set and dist.is_distributed:
            count = torch.tensor(
                [float(data.num_samples)], dtype=torch.float64, device=local.device
            )
            total = dist.reduce_fn(count)
            local = dist.reduce_fn((local * count / total).reshape(1)).reshape(())
        return float(local)

    def _gradient_finite(
        self, model: nn.Module, loss_fn: LossFn, data: BatchSet, dist: DistributedInfo
    ) -> bool:
        """Whether the loss gradient on the first samples is finite (checked on every rank).

        One gradient of at most ``GRADIENT_CHECK_SAMPLES`` samples: a NaN gradient behind a
        finite loss would otherwise surface as an "ill-conditioned" eigensolver or as diverged
        SGLD chains, far from its cause.
        """
        inputs, targets = data.batches[0]
        functional = FunctionalLoss(model, loss_fn)
        theta = functional.layout.flat_values(model).detach().requires_grad_(True)
        batch = (inputs[:GRADIENT_CHECK_SAMPLES], targets[:GRADIENT_CHECK_SAMPLES])
        with module_mode(model, self.eval_mode):
            (grad,) = torch.autograd.grad(functional(theta, batch), theta, allow_unused=True)
        ok = torch.ones(1, device=theta.device)
        if grad is not None and not torch.isfinite(grad).all():
            ok = torch.zeros(1, device=theta.device)
        if dist.is_distributed:
            ok = dist.reduce_fn(ok) / dist.world_size
        return bool(ok.item() == 1.0)

    def _warn(self, message: str) -> None:
        rank_zero_warn(f"{self.name}: {message}")

    def _shared_measurement(
        self, trainer: Any, pl_module: Any, loss_fn: LossFn, step: int
    ) -> EpochMeasurement:
        store = self._store or MeasurementStore.of(trainer)
        key = self.set_key(loss_fn)
        data = self._ensure_measurement_set(trainer, pl_module)
        dist = DistributedInfo.from_trainer(trainer)

        def build() -> EpochMeasurement:
            model = _measurement_model(pl_module)
            return EpochMeasurement(
                key=key,
                step=step,
                model=model,
                loss_fn=loss_fn,
                data=data,
                dist=dist,
                center_loss=self._center_loss(model, loss_fn, data, dist),
                store=store,
                gradient_finite=self._gradient_finite(model, loss_fn, data, dist),
            )

        return store.epoch(key, step, build)

    def _run(self, trainer: Any, pl_module: Any, step: int) -> Measurement | None:
        loss_fn = self._resolved_loss_fn or self.resolve_loss_fn(pl_module)
        start = time.perf_counter()
        with measurement_context(pl_module):
            shared = self._shared_measurement(trainer, pl_module, loss_fn, step)
            if not math.isfinite(shared.center_loss):
                self._warn(
                    f"the loss on the measurement set is {shared.center_loss} at epoch {step}; "
                    "nothing is measured or logged for this epoch"
                )
                return None
            if not shared.gradient_finite:
                self._warn(
                    f"the loss is finite ({shared.center_loss:.6g}) but its gradient has NaN or "
                    f"inf entries at epoch {step} (an operation whose derivative is not finite "
                    "at these weights, or an overflow in backward); nothing is measured or "
                    "logged for this epoch"
                )
                return None
            ctx = MeasurementContext(
                trainer=trainer,
                pl_module=shared.model,
                loss_fn=loss_fn,
                data=shared.data,
                generator=self.generator(step, _module_device(pl_module)),
                step=step,
                dist=shared.dist,
                eval_mode=self.eval_mode,
                center_loss=shared.center_loss,
                dataset_size=int(self._dataset_size or shared.data.num_samples),
                name=self.name,
                shared=shared,
            )
            before = set(shared.seconds)
            try:
                result = self.measure(ctx)
            except Exception as err:  # noqa: BLE001 - a measurement never ends training
                self._warn(
                    f"the measurement failed at epoch {step} ({type(err).__name__}: {err}); "
                    "its tags are skipped for this epoch and training continues"
                )
                return None
            result.shared_seconds = {k: v for k, v in shared.seconds.items() if k not in before}
            result.scalars = self._finite_scalars(result.scalars, step)
            result.scalars[self.time_tag] = time.perf_counter() - start
            sink = MetricSink(trainer, pl_module, step)
            sink.scalars(result.scalars)
            if sink.is_global_zero and sink.tensorboard:
                self._log_rich(sink, result, step)
        self.last_measurement = result
        return result

    def _finite_scalars(self, scalars: dict[str, float], step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for tag, value in scalars.items():
            if value is None:
                continue
            v = float(value)
            if math.isfinite(v):
                out[self.tag(tag)] = v
            else:
                self._warn(f"{tag} is {v} at epoch {step}; the tag is skipped for this epoch")
        return out

    def _log_rich(self, sink: MetricSink, result: Measurement, step: int) -> None:
        # Pictures are presentation: a plotting failure is reported, never fatal to training.
        tag = self.tag
        items: list[tuple[str, Callable[[], None]]] = [
            *((t, lambda t=t, f=f: sink.image(tag(t), f())) for t, f in result.images.items()),
            *((t, lambda t=t, f=f: sink.figure(tag(t), f())) for t, f in result.figures.items()),
            *(
                (t, lambda t=t, h=h: sink.histogram(tag(t), *h))
                for t, h in result.histograms.items()
            ),
        ]
        for name, write in items:
            try:
                write()
            except Exception as err:  # noqa: BLE001
                self._warn(f"could not draw {name} at epoch {step} ({err!r}); skipped")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _measurement_dtype(module: nn.Module) -> torch.dtype:
    """The dtype measurements run in: the parameters' own, float32 for half precision."""
    for p in module.parameters():
        return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
    return torch.float32


def _measurement_model(module: nn.Module) -> nn.Module:
    """``module`` itself, or a float32 copy if any parameter is half precision.

    Under mixed precision (``"16-mixed"``, ``"bf16-mixed"``) the parameters are already float32
    and autocast is disabled by the guard. Under ``"*-true"`` half precision the parameters
    themselves are half: measuring on a float32 copy keeps HVPs and losses in full precision and
    the data consistent with the weights. ``"64-true"`` measures in float64 on the module itself
    (the measurement set is gathered in the parameters' dtype). The Trainer a LightningModule
    references is shared with the copy, not copied.
    """
    if not any(p.dtype in _LOW_PRECISION for p in module.parameters()):
        return module
    trainer = getattr(module, "_trainer", None)
    memo = {id(trainer): trainer} if trainer is not None else {}
    clone = copy.deepcopy(module, memo)
    for p in clone.parameters():
        if p.dtype in _LOW_PRECISION:
            p.data = p.data.float()
    for _, b in clone.named_buffers():
        if b.dtype in _LOW_PRECISION:
            b.data = b.data.float()
    return clone


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
