"""Helpers shared by the benchmark scripts: Fashion-MNIST without the data module, timing.

Only numpy and torch are imported here, so a script can also run under the peer virtualenv
(``/work/peervenv``, no Lightning) with ``PYTHONPATH`` pointing at the repository.
"""

from __future__ import annotations

import gzip
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "data_root",
    "load_fashion_mnist",
    "median_seconds",
    "report_line",
]

PEER_PYTHON = os.environ.get("LIGHTNING_CURVATURE_PEER_PYTHON", "/work/peervenv/bin/python")


def data_root() -> Path:
    """``$LIGHTNING_CURVATURE_DATA`` (default ``../shared/data`` next to the repository)."""
    root = os.environ.get("LIGHTNING_CURVATURE_DATA")
    if root:
        return Path(root)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(
    split: str = "train", num: int | None = None, *, dataset: str = "fashion-mnist"
) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``num`` images ``(n, 1, 28, 28)`` and labels, read from the IDX ``.gz`` files.

    Pixels are scaled to [0, 1] and standardized with the Fashion-MNIST training mean / std
    (0.2860 / 0.3530); float32 images, int64 labels. ``dataset="mnist"`` reads MNIST instead.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    root = data_root() / dataset
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
    if num is not None:
        images, labels = images[:num], labels[:num]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = (x - 0.2860) / 0.3530
    return x, torch.from_numpy(labels.astype(np.int64))


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
