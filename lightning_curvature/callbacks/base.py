"""``CurvatureCallback``: everything the measuring callbacks share.

A subclass only says what to measure: it implements :meth:`CurvatureCallback.measure`, which gets a
:class:`MeasurementContext` (model, loss, measurement data, per-epoch generator, ``reduce_fn``) and
returns a :class:`Measurement` (scalars by tag, figure factories, images, histograms). The base
class owns the rest of the contract in ``DESIGN.md``:

- shared keyword arguments, validated at construction (``ValueError`` naming the argument);
- the loss function, resolved at ``setup`` (``loss_fn=``, else ``pl_module.loss_fn``, else
  ``pl_module.criterion``, else an error that says how to provide one);
- the measurement set, drawn once from the training dataset with the callback's own generator
  and kept in ``state_dict()``; under DDP each rank measures its shard;
- scheduling: after each ``every_n_epochs``-th training epoch (``on_train_epoch_end``, i.e. after
  that epoch's validation), never during the sanity check, optionally once before training;
- per-measurement generators derived from ``(seed, epoch)``;
- the side-effect guard (:func:`~lightning_curvature.callbacks.guard.measurement_context`);
- a non-finite loss or estimate: a warning and the tag skipped for that epoch, never a crash,
  never a NaN in the logs;
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
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_curvature.curvature import BatchSet, FunctionalLoss, module_mode

from .distributed import DistributedInfo
from .guard import measurement_context
from .measurement_set import derive_seed, draw_indices, gather_samples, training_dataset
from .progress import MeasurementProgress
from .sink import MetricSink

__all__ = ["CurvatureCallback", "Measurement", "MeasurementContext"]

LossFn = Callable[[Any, Any], Tensor]

# Numerical failures an engine may raise on a degenerate (e.g. overflowing) Hessian: reported as a
# warning and the epoch's tags skipped, like a non-finite estimate. Programming errors propagate.
NUMERICAL_ERRORS: tuple[type[BaseException], ...] = (
    torch.linalg.LinAlgError,
    np.linalg.LinAlgError,
    FloatingPointError,
    ZeroDivisionError,
)


# -- argument validation ---------------------------------------------------------------------
def check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> int | None:
    """Return ``value`` if it is an int >= ``minimum`` (or None when allowed), else ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """Return ``value`` as float if it is finite and within the range, else ValueError."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
    if not ok:
        bracket = "(" if low_open else "["
        extra = " or None" if allow_none else ""
        raise ValueError(
            f"{name} must be a number in {bracket}{low}, {high}]{extra}, got {value!r}"
        )
    return float(value)


# -- what a measurement gets and returns ----------------------------------------------------
@dataclass
class MeasurementContext:
    """Inputs of one measurement.

    Attributes
    ----------
    trainer, pl_module :
        The Lightning objects (``pl_module`` is the model the engine differentiates).
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar mean loss``.
    data : BatchSet
        This rank's part of the measurement set (the whole set if the callback does not shard).
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
    """

    scalars: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Callable[[], Any]] = field(default_factory=dict)
    images: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


# -- the base callback ------------------------------------------------------------------------
class CurvatureCallback(Callback):
    """Base class of the measuring callbacks (see the module docstring for the contract).

    Parameters
    ----------
    num_samples : int or None
        Size of the measurement set drawn from the training dataset (None = all of it).
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
        ``pl_module.criterion``.
    eval_mode : bool
        Measure with the model in eval mode (no dropout, BatchNorm running statistics).
    measure_on_train_start : bool
        Also measure once before the first training step (logged at epoch 0).
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
    ) -> None:
        super().__init__()
        self.num_samples = check_int("num_samples", num_samples, 1, allow_none=True)
        self.batch_size = check_int("batch_size", batch_size, 1, allow_none=True)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, 1)
        self.seed = check_int("seed", seed, 0)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn)}"
            )
        if not isinstance(eval_mode, bool):
            raise ValueError(f"eval_mode must be True or False, got {eval_mode!r}")
        if not isinstance(measure_on_train_start, bool):
            raise ValueError(
                f"measure_on_train_start must be True or False, got {measure_on_train_start!r}"
            )
        self.loss_fn = loss_fn
        self.eval_mode = eval_mode
        self.measure_on_train_start = measure_on_train_start
        self._resolved_loss_fn: LossFn | None = None
        self._indices: Tensor | None = None
        self._dataset_size: int | None = None
        self._data: BatchSet | None = None
        self._data_key: tuple | None = None
        self.last_measurement: Measurement | None = None

    # -- identity ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Used in ``time/<name>``, warnings and progress bars."""
        return type(self).__name__

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            seed=self.seed, num_samples=self.num_samples, every_n_epochs=self.every_n_epochs
        )

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

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._resolved_loss_fn = self.resolve_loss_fn(pl_module)

    def resolve_loss_fn(self, pl_module: Any) -> LossFn:
        """``loss_fn=``, else ``pl_module.loss_fn``, else ``pl_module.criterion``."""
        if self.loss_fn is not None:
            return self.loss_fn
        for attr in ("loss_fn", "criterion"):
            candidate = getattr(pl_module, attr, None)
            if callable(candidate):
                return candidate
        raise ValueError(
            f"{self.name} needs the training loss as loss_fn(outputs, targets) -> scalar mean "
            f"loss, but {type(pl_module).__name__} has no callable `loss_fn` or `criterion` "
            f"attribute. Either pass it to the callback, e.g. "
            f"{self.name}(loss_fn=torch.nn.CrossEntropyLoss()), or set "
            f"`self.loss_fn = torch.nn.CrossEntropyLoss()` in your LightningModule's __init__."
        )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        with measurement_context(pl_module):
            self._ensure_measurement_set(trainer, pl_module)
        resumed = trainer.current_epoch > 0 or trainer.global_step > 0
        if self.measure_on_train_start and not resumed:
            self._run(trainer, pl_module, step=0)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False):
            return
        step = trainer.current_epoch + 1
        if step % self.every_n_epochs == 0:
            self._run(trainer, pl_module, step=step)

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "indices": None if self._indices is None else self._indices.clone(),
            "dataset_size": self._dataset_size,
            "extra": self.extra_state(),
        }

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

    def _ensure_measurement_set(self, trainer: Any, pl_module: Any) -> BatchSet:
        dataset = training_dataset(trainer)
        size = len(dataset)
        if self._indices is None:
            self._indices = draw_indices(size, self.num_samples, self.seed)
            self._dataset_size = size
        elif self._dataset_size is not None and self._dataset_size != size:
            raise ValueError(
                f"{self.name}: the checkpointed measurement set was drawn from a training set "
                f"of {self._dataset_size} samples, but the training set now has {size}"
            )
        dist = DistributedInfo.from_trainer(trainer)
        device = _module_device(pl_module)
        key = (id(dataset), dist.rank, dist.world_size, str(device))
        if self._data is None or self._data_key != key:
            indices = dist.shard(self._indices) if self.shard_measurement_set else self._indices
            if len(indices) == 0:
                raise ValueError(
                    f"{self.name}: num_samples={len(self._indices)} is smaller than the number of "
                    f"processes ({dist.world_size}); every rank needs at least one sample"
                )
            self._data = gather_samples(
                dataset, indices, batch_size=self.gather_batch_size(), device=device
            )
            self._data_key = key
        return self._data

    def _center_loss(
        self, pl_module: nn.Module, loss_fn: LossFn, data: BatchSet, dist: DistributedInfo
    ) -> float:
        functional = FunctionalLoss(pl_module, loss_fn)
        theta = functional.layout.flat_values(pl_module)
        with torch.no_grad(), module_mode(pl_module, self.eval_mode):
            local = functional.mean_loss(theta, data).detach().to(torch.float64)
        if self.shard_measurement_set and dist.is_distributed:
            count = torch.tensor(
                [float(data.num_samples)], dtype=torch.float64, device=local.device
            )
            total = dist.reduce_fn(count)
            local = dist.reduce_fn((local * count / total).reshape(1)).reshape(())
        return float(local)

    def _warn(self, message: str) -> None:
        rank_zero_warn(f"{self.name}: {message}")

    def _run(self, trainer: Any, pl_module: Any, step: int) -> Measurement | None:
        loss_fn = self._resolved_loss_fn or self.resolve_loss_fn(pl_module)
        dist = DistributedInfo.from_trainer(trainer)
        start = time.perf_counter()
        with measurement_context(pl_module):
            data = self._ensure_measurement_set(trainer, pl_module)
            model = _full_precision(pl_module)
            center = self._center_loss(model, loss_fn, data, dist)
            if not math.isfinite(center):
                self._warn(
                    f"the loss on the measurement set is {center} at epoch {step}; "
                    "nothing is measured or logged for this epoch"
                )
                return None
            ctx = MeasurementContext(
                trainer=trainer,
                pl_module=model,
                loss_fn=loss_fn,
                data=data,
                generator=self.generator(step, _module_device(pl_module)),
                step=step,
                dist=dist,
                eval_mode=self.eval_mode,
                center_loss=center,
                dataset_size=int(self._dataset_size or data.num_samples),
                name=self.name,
            )
            try:
                result = self.measure(ctx)
            except NUMERICAL_ERRORS as err:
                self._warn(
                    f"the measurement failed numerically at epoch {step} ({err!r}); "
                    "its tags are skipped for this epoch"
                )
                return None
            seconds = time.perf_counter() - start
            scalars: dict[str, float] = {}
            for tag, value in result.scalars.items():
                if value is None:
                    continue
                v = float(value)
                if math.isfinite(v):
                    scalars[tag] = v
                else:
                    self._warn(f"{tag} is {v} at epoch {step}; the tag is skipped for this epoch")
            scalars[f"time/{self.name}"] = seconds
            result.scalars = scalars
            sink = MetricSink(trainer, pl_module, step)
            sink.scalars(scalars)
            if sink.is_global_zero and sink.tensorboard:
                self._log_rich(sink, result, step)
        self.last_measurement = result
        return result

    def _log_rich(self, sink: MetricSink, result: Measurement, step: int) -> None:
        # Pictures are presentation: a plotting failure is reported, never fatal to training.
        items: list[tuple[str, Callable[[], None]]] = [
            *((t, lambda t=t, f=f: sink.image(t, f())) for t, f in result.images.items()),
            *((t, lambda t=t, f=f: sink.figure(t, f())) for t, f in result.figures.items()),
            *((t, lambda t=t, h=h: sink.histogram(t, *h)) for t, h in result.histograms.items()),
        ]
        for tag, write in items:
            try:
                write()
            except Exception as err:  # noqa: BLE001
                self._warn(f"could not draw {tag} at epoch {step} ({err!r}); skipped")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _full_precision(module: nn.Module) -> nn.Module:
    """``module`` itself, or a float32 copy if any parameter is half precision.

    Under mixed precision (``"16-mixed"``, ``"bf16-mixed"``) the parameters are already float32
    and autocast is disabled by the guard. Under ``"*-true"`` precision the parameters themselves
    are half: measuring on a float32 copy keeps HVPs and losses in full precision and the data
    (float32 samples) consistent with the weights. The Trainer a LightningModule references is
    shared with the copy, not copied.
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
