"""MNIST-family data: strict IDX parsing, verified local lookup / download, a LightningDataModule.

>>> dm = MNISTDataModule("fashion_mnist", train_subset=5000)   # doctest: +SKIP
>>> dm.setup("fit"); x, y = dm.train_tensors                    # doctest: +SKIP
>>> x, y = load_tensors("fashion_mnist_sample", "test")         # doctest: +SKIP

Only the data module needs Lightning: it (and the loaders next to it) is imported on first
access, so ``from lightning_curvature.data import load_tensors, read_idx`` works without
Lightning installed (the benchmarks' peer virtualenv).
"""

from __future__ import annotations

from lightning_curvature._lazy import lazy_exports

from .idx import IDXFile, IDXFormatError, encode_idx, parse_idx, read_idx
from .packaged import sample_dir
from .sources import (
    DATASETS,
    ENV_VAR,
    DatasetNotFoundError,
    DatasetSpec,
    FileSpec,
    cache_root,
    check_values,
    load_split,
    resolve_split,
    search_dirs,
)
from .tensors import load_tensors, normalize, pixels_to_unit

# name -> module of the names that import Lightning, loaded on first access (PEP 562).
_LAZY = {
    "EpochShuffleSampler": ".datamodule",
    "MNISTDataModule": ".datamodule",
    "TensorBatchDataset": ".datamodule",
}

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "DatasetNotFoundError",
    "DatasetSpec",
    "EpochShuffleSampler",
    "FileSpec",
    "IDXFile",
    "IDXFormatError",
    "MNISTDataModule",
    "TensorBatchDataset",
    "cache_root",
    "check_values",
    "encode_idx",
    "load_split",
    "load_tensors",
    "normalize",
    "parse_idx",
    "pixels_to_unit",
    "read_idx",
    "resolve_split",
    "sample_dir",
    "search_dirs",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
