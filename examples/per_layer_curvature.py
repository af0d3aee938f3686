"""Per-layer Hessian traces and the H = GGN + residual spectra during a short Fashion-MNIST run.

Trains an ``MLP(784, (128, 128), 10)`` (ReLU, SGD) on a Fashion-MNIST training subset with two
curvature callbacks sharing one measurement set, one Hessian and one Lanczos run per measured
epoch:

* :class:`~lightning_curvature.callbacks.HessianTrace` (Krylov-deflated trace): ``curvature/trace``
  and ``curvature/trace_layer/<name>``, tr H_bb of every parameter tensor, with the bar chart;
* :class:`~lightning_curvature.callbacks.HessianDecomposition`: the SLQ spectra of H, its
  Gauss–Newton part H₀ and the residual H₁ = H − H₀, and their traces (seed 004's picture).

Writes ``per_layer_trace.png`` and ``spectrum_decomposition.png`` (the figures the callbacks log
at the last measured epoch) and ``per_layer_curvature.json`` (every logged scalar per epoch) to
``--out``, plus the TensorBoard run under ``--logdir``. A few minutes on two shared CPU threads.

Run::

    PYTHONPATH=. LIGHTNING_CURVATURE_DATA=<data dir> python examples/per_layer_curvature.py \\
        [--train-subset 5000] [--epochs 4] [--out docs/figures]

Without a data folder, ``--dataset fashion_mnist_sample`` uses the sample shipped in the package.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_curvature.callbacks import HessianDecomposition, HessianTrace
from lightning_curvature.data import MNISTDataModule
from lightning_curvature.models import MLP, ImageClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--train-subset", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/figures")
    parser.add_argument("--logdir", default=None, help="TensorBoard folder (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logdir = args.logdir or tempfile.mkdtemp(prefix="per_layer_")

    data = MNISTDataModule(
        args.dataset, batch_size=128, val_size=1000, train_subset=args.train_subset,
        seed=args.seed, download=False,
    )  # fmt: skip
    module = ImageClassifier(MLP(784, (128, 128), 10), optimizer="sgd", lr=0.05)
    shared = {"num_samples": args.num_samples, "every_n_epochs": 2, "seed": args.seed,
              "measure_on_train_start": True}  # fmt: skip
    trace = HessianTrace(num_probes=20, krylov_iters=30, per_layer=True, **shared)
    decomposition = HessianDecomposition(num_iters=40, num_runs=2, trace_matvecs=45, **shared)
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(logdir, name="per_layer", default_hp_metric=False),
        callbacks=[trace, decomposition], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start

    figures = {
        "per_layer_trace.png": trace.last_measurement.figures["curvature/trace_layer"],
        "spectrum_decomposition.png": decomposition.last_measurement.figures[
            "curvature/spectrum_decomposition"
        ],
    }
    for name, make in figures.items():
        make().savefig(out / name, dpi=110)
    scalars = _logged_scalars(logdir)
    record = {
        "settings": {k: v for k, v in vars(args).items() if k != "logdir"}
        | {"model": "MLP 784-128-128-10 (ReLU), SGD lr 0.05, batch 128"},
        "seconds": seconds,
        "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
        "scalars": scalars,
    }
    (out / "per_layer_curvature.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {', '.join(figures)} and per_layer_curvature.json to {out} ({seconds:.0f} s)")


def _logged_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """``{tag: {epoch: value}}`` of the curvature tags in the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {}
    for path in Path(logdir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(("curvature/", "val/", "train/")):
                found.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return dict(sorted(found.items()))


if __name__ == "__main__":
    main()
