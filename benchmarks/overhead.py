"""Callback overhead: what each curvature callback adds to a CPU training epoch at its defaults.

Setup (issue 6): Fashion-MNIST 60k training images, MLP 784-256-256-10, SGD (lr 0.01, momentum
0.9), batch 128, CPU. Two fits in one process, same seed:

1. suite: ``--epochs`` epochs with the full default suite. Every hook of every callback is timed
   by a wrapper, so each callback's cost is attributed to it even though they run together, and
   the epoch's training time is its wall time minus the callbacks' time (same machine load as
   the measurements; on a shared machine only such within-epoch ratios are meaningful). For
   the timing run every callback measures every epoch (``every_n_epochs=1``); the table then
   amortizes one measurement over the callback's default ``every_n_epochs``. Work the callbacks
   share (the epoch's Hessian operator and Lanczos run, ``lightning_curvature.callbacks.shared``)
   is charged separately and amortized over the epochs in which at least one of its readers
   measures on the default schedule (one cycle of the least common multiple of the cadences);
2. baseline: the same fit with no callback (cross-check of the training time).

The last epoch is reported (warm starts active, one-off costs such as gathering the measurement
set excluded). The accuracy the defaults buy is printed from the same measurement: Hutch++
stderr, Lanczos residuals, LLC std over chains and R-hat, saddle-fraction and projection-trace
stderr.

Run (about 2 minutes, single-threaded)::

    LIGHTNING_CURVATURE_DATA=<data root> PYTHONPATH=. python benchmarks/overhead.py

``--train-subset N`` trains on N images only (a quick smoke run; overhead ratios then change).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_curvature.callbacks as cb

HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
)
TARGET = 0.25


#: The epoch being timed, set once per epoch by :class:`EpochTimer` (reading
#: ``trainer.current_epoch`` in every wrapped per-step hook was itself a measurable cost that
#: the table would have charged to the callbacks).
_CURRENT_EPOCH = [0]


class HookTimer:
    """Wrap every hook of ``callback`` and accumulate its wall time per epoch."""

    def __init__(self, callback: L.Callback) -> None:
        self.callback = callback
        self.seconds: dict[int, float] = {}
        for name in HOOKS:
            original = getattr(callback, name)
            setattr(callback, name, self._timed(original))

    def _timed(self, fn: Any) -> Any:
        seconds, clock, epoch_of = self.seconds, time.perf_counter, _CURRENT_EPOCH

        @functools.wraps(fn)
        def wrapper(trainer: L.Trainer, *args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(trainer, *args, **kwargs)
            finally:
                epoch = epoch_of[0]
                seconds[epoch] = seconds.get(epoch, 0.0) + clock() - start

        return wrapper


class EpochMarker(L.Callback):
    """First in the callback list: records the epoch before any timed hook of it runs."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        _CURRENT_EPOCH[0] = trainer.current_epoch


class EpochTimer(L.Callback):
    """Wall time from the start of an epoch to the end of every other callback's epoch-end hook."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.seconds[trainer.current_epoch] = time.perf_counter() - self._start


def default_suite() -> list[L.Callback]:
    """The defaults, except ``every_n_epochs=1`` so every callback measures in the timed epoch."""
    suite = cb.default_callbacks()
    for c in suite:
        if isinstance(c, cb.CurvatureCallback):
            c.default_every_n_epochs = c.every_n_epochs
            c.every_n_epochs = 1
    return suite


def accurate_suite(epochs: int) -> list[L.Callback]:
    """Large budgets, measuring only after the last epoch: the reference for the defaults."""
    shared = {"every_n_epochs": epochs}
    return [
        cb.HessianTrace(method="hutchpp", num_matvecs=150, **shared),
        cb.HessianEigenvalues(max_iters=100, tol=1e-6, **shared),
        cb.HessianSpectrum(num_iters=80, num_runs=3, **shared),
        cb.LocalLearningCoefficient(num_chains=8, num_draws=100, num_burnin=50, **shared),
        cb.LossProjection(num_random_projections=64, num_trace_directions=32, **shared),
    ]


COMPARED = (
    "curvature/trace",
    "curvature/trace_stderr",
    "curvature/lambda_max",
    "curvature/lambda_min",
    "diagnostics/curvature/lambda_min_residual",
    "curvature/negative_fraction",
    "curvature/negative_fraction_3sigma",
    "llc/lambda_hat",
    "diagnostics/llc/r_hat",
    "llc/lambda_hat_std",
    "landscape/random_saddle_fraction",
    "landscape/projection_trace",
    "landscape/projection_trace_stderr",
)


def fit(datamodule: Any, callbacks: list[L.Callback], epochs: int, seed: int, log_dir: str) -> Any:
    from lightning_curvature.models import MLP, ImageClassifier

    torch.manual_seed(seed)
    module = ImageClassifier(MLP(784, (256, 256), 10), optimizer="sgd", lr=0.01, momentum=0.9)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=TensorBoardLogger(log_dir, name="overhead"),
        callbacks=[EpochMarker(), *callbacks, timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return timer, module


def accuracy_notes(suite: list[L.Callback]) -> dict[str, str]:
    notes: dict[str, str] = {}
    for c in suite:
        m = getattr(c, "last_measurement", None)
        if m is None:
            continue
        s = m.scalars
        if isinstance(c, cb.HessianTrace):
            notes[c.name] = (
                f"tr H = {s['curvature/trace']:.4g} ± {s['curvature/trace_stderr']:.2g} "
                f"({100 * s['curvature/trace_stderr'] / abs(s['curvature/trace']):.1f}% stderr)"
            )
        elif isinstance(c, cb.HessianEigenvalues):
            notes[c.name] = (
                f"λmax = {s['curvature/lambda_max']:.4g} (residual "
                f"{s['diagnostics/curvature/lambda_max_residual']:.2g}), λmin = "
                f"{s['curvature/lambda_min']:.3g} "
                f"(residual {s['diagnostics/curvature/lambda_min_residual']:.2g})"
            )
        elif isinstance(c, cb.HessianSpectrum):
            notes[c.name] = f"negative fraction = {s['curvature/negative_fraction']:.3f}"
        elif isinstance(c, cb.LocalLearningCoefficient):
            notes[c.name] = (
                f"λ̂ = {s['llc/lambda_hat']:.4g} ± {s['llc/lambda_hat_std']:.2g} (std over "
                f"{c.num_chains} chains), R̂ = {s.get('diagnostics/llc/r_hat', float('nan')):.3g}"
            )
        elif isinstance(c, cb.LossProjection):
            notes[c.name] = (
                f"saddle fraction = {s['landscape/random_saddle_fraction']:.2f} of "
                f"{c.num_random_projections}; HVP-free tr H = "
                f"{s['landscape/projection_trace']:.4g} ± "
                f"{s['landscape/projection_trace_stderr']:.2g}"
            )
    return notes


#: Shared work and the callbacks that read it (see ``lightning_curvature.callbacks.shared``).
SHARED_READERS = {
    "hessian": (cb.HessianTrace, cb.HessianEigenvalues, cb.HessianSpectrum, cb.LossProjection),
    "lanczos": (cb.HessianTrace, cb.HessianEigenvalues, cb.LossProjection),
}


def _share_of_epochs(cadences: list[int]) -> float:
    """Share of epochs in which at least one of the cadences measures (over one lcm cycle)."""
    if not cadences:
        return 0.0
    cycle = math.lcm(*cadences)
    return sum(any(e % c == 0 for c in cadences) for e in range(1, cycle + 1)) / cycle


def amortized_rows(
    suite: list[L.Callback], hook_timers: list[HookTimer], last: int
) -> tuple[list[tuple[str, float, int, float]], float]:
    """Per-callback and shared cost of the last epoch, amortized over the default schedule."""
    rows: list[tuple[str, float, int, float]] = []
    shared_seconds: dict[str, float] = {}
    total = 0.0
    for c, ht in zip(suite, hook_timers, strict=True):
        per_measurement = ht.seconds.get(last, 0.0)
        measurement = getattr(c, "last_measurement", None)
        if measurement is not None:
            for item, sec in measurement.shared_seconds.items():
                shared_seconds[item] = shared_seconds.get(item, 0.0) + sec
                per_measurement -= sec
        every = getattr(c, "default_every_n_epochs", 1)
        amortized = per_measurement / every
        total += amortized
        name = c.name if hasattr(c, "name") else type(c).__name__
        rows.append((name, per_measurement, every, amortized))
    for item, sec in shared_seconds.items():
        readers = [
            getattr(c, "default_every_n_epochs", 1)
            for c in suite
            if isinstance(c, SHARED_READERS.get(item, ()))
            and not (isinstance(c, cb.HessianTrace) and item == "lanczos" and c.method != "krylov")
        ]
        share = _share_of_epochs(readers)
        every = round(1 / share) if share > 0 else 0
        rows.append((f"shared: {item}", sec, every, sec * share))
        total += sec * share
    return rows, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="also write results here")
    parser.add_argument(
        "--no-accurate",
        dest="accurate",
        action="store_false",
        help="skip the large-budget reference measurement (about 1 minute)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared, oversubscribed machine more threads "
        "make every op wait on OpenMP barriers and timings swing by 10x)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MPLBACKEND", "Agg")

    from lightning_curvature.data import MNISTDataModule

    dm = MNISTDataModule(
        "fashion_mnist", batch_size=128, val_size=0, train_subset=args.train_subset, seed=0
    )
    with tempfile.TemporaryDirectory() as tmp:
        suite = default_suite()
        hook_timers = [HookTimer(c) for c in suite]
        suite_timer, _ = fit(dm, suite, args.epochs, args.seed, tmp)
        base_timer, _ = fit(dm, [], args.epochs, args.seed, tmp)
        accurate = accurate_suite(args.epochs) if args.accurate else []
        if accurate:
            # Same seed, and callbacks never change training: the same weights as the suite run.
            fit(dm, accurate, args.epochs, args.seed, tmp)

    last = args.epochs - 1
    later = [base_timer.seconds[e] for e in range(1, args.epochs)] or [base_timer.seconds[0]]
    baseline = statistics.median(later)
    # The denominator is the training part of the *same* epoch of the suite run (its wall time
    # minus every callback's hook time): measured under the same machine load as the callbacks,
    # which matters on a shared machine. The separate baseline fit is printed as a cross-check.
    hooks_last = sum(ht.seconds.get(last, 0.0) for ht in hook_timers)
    wall_suite = suite_timer.seconds[last]
    epoch = wall_suite - hooks_last
    rows, total = amortized_rows(suite, hook_timers, last)
    notes = accuracy_notes(suite)

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"train images {args.train_subset or 60000}, epochs {args.epochs}"
    )
    print(f"training time of epoch {last} in the suite run (callbacks excluded): {epoch:.2f} s")
    print(f"cross-check, separate fit without callbacks: {baseline:.2f} s per epoch")
    print()
    print(f"{'callback':<26}{'s/measurement':>14}{'every_n':>9}{'s/epoch':>10}{'% epoch':>9}")
    for name, per, every, amort in rows:
        print(f"{name:<26}{per:>14.3f}{every:>9d}{amort:>10.3f}{100 * amort / epoch:>8.1f}%")
    share = 100 * total / epoch
    verdict = "PASS" if total <= TARGET * epoch else "FAIL"
    print(
        f"{'full suite (amortized)':<26}{'':>14}{'':>9}{total:>10.3f}{share:>8.1f}%"
        f"   target <= {100 * TARGET:.0f}%: {verdict}"
    )
    print(
        f"all callbacks measuring in the same epoch: {hooks_last:.2f} s "
        f"({100 * hooks_last / epoch:.0f}% of the epoch's training time)"
    )
    print()
    for name, note in notes.items():
        print(f"{name}: {note}")
    reference: dict[str, float] = {}
    for c in accurate:
        if c.last_measurement is not None:
            reference.update(c.last_measurement.scalars)
    measured: dict[str, float] = {}
    for c in suite:
        if getattr(c, "last_measurement", None) is not None:
            measured.update(c.last_measurement.scalars)
    if reference:
        print()
        print("defaults vs large budgets (same weights, after the last epoch):")
        print(f"{'tag':<36}{'defaults':>12}{'large budget':>14}")
        for tag in COMPARED:
            if tag in measured and tag in reference:
                print(f"{tag:<36}{measured[tag]:>12.4g}{reference[tag]:>14.4g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "epoch_seconds": epoch,
                    "baseline_fit_epoch_seconds": baseline,
                    "rows": rows,
                    "total_amortized": total,
                    "wall_suite_epoch": wall_suite,
                    "notes": notes,
                    "defaults": {t: measured.get(t) for t in COMPARED},
                    "large_budget": {t: reference.get(t) for t in COMPARED},
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    sys.exit(main())
