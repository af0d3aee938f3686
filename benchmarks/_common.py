"""Helpers shared by the benchmark scripts: data through the package, the peer interpreter, timing.

Only numpy, torch and the Lightning-free parts of the package (``lightning_curvature.data``'s
loaders, ``lightning_curvature.models``' networks) are imported, so a script also runs under the
peer virtualenv (no Lightning) with ``PYTHONPATH`` pointing at the repository.

Environment variables (documented in ``docs/benchmarks.md``):

``LIGHTNING_CURVATURE_DATA``
    Root folder with ``fashion-mnist/`` (and ``mnist/``) IDX files; the package's usual lookup
    order applies (user cache, ``/usr/share/datasets``) when it is unset.
``LIGHTNING_CURVATURE_PEER_PYTHON``
    Interpreter of the peer virtualenv (PyHessian, curvlinops, devinterp, loss-landscapes);
    default ``<repository>/.peervenv/bin/python``, which ``benchmarks/make_peer_venv.sh`` builds.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_curvature.data import ENV_VAR, load_tensors

__all__ = [
    "PEER_PYTHON",
    "REPO",
    "data_root",
    "load_fashion_mnist",
    "median_seconds",
    "report_line",
]

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = os.environ.get(
    "LIGHTNING_CURVATURE_PEER_PYTHON", str(REPO / ".peervenv" / "bin" / "python")
)
_DATASETS = {"fashion-mnist": "fashion_mnist", "mnist": "mnist"}


def data_root() -> Path | None:
    """``$LIGHTNING_CURVATURE_DATA`` if set (else the package's lookup order decides)."""
    root = os.environ.get(ENV_VAR)
    return Path(root) if root else None


def load_fashion_mnist(
    split: str = "train", num: int | None = None, *, dataset: str = "fashion-mnist"
) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``num`` images ``(n, 1, 28, 28)`` and labels of an official split (file order).

    Read, verified and normalized by :func:`lightning_curvature.data.load_tensors` (pixels in
    [0, 1], standardized with the dataset's training mean / std, 0.2860 / 0.3530 for
    Fashion-MNIST); float32 images, int64 labels. ``dataset="mnist"`` reads MNIST instead.
    """
    return load_tensors(_DATASETS[dataset], split, num)


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report_line(label: str, value: float, target: str | None = None, ok: bool | None = None) -> str:
    """``label  value  (target: ..., met/MISSED)`` for the benchmark printouts."""
    text = f"{label:<58s} {value:>10.4g}"
    if target is not None:
        verdict = "" if ok is None else ("  met" if ok else "  MISSED")
        text += f"   (target {target}{verdict})"
    return text
