"""MNIST-family data: strict IDX parsing, verified local lookup / download, a LightningDataModule.

>>> dm = MNISTDataModule("fashion_mnist", train_subset=5000)   # doctest: +SKIP
>>> dm.setup("fit"); x, y = dm.train_tensors                    # doctest: +SKIP
"""

from .datamodule import EpochShuffleSampler, MNISTDataModule, TensorBatchDataset
from .idx import IDXFile, IDXFormatError, encode_idx, parse_idx, read_idx
from .sources import (
    DATASETS,
    ENV_VAR,
    DatasetNotFoundError,
    DatasetSpec,
    FileSpec,
    cache_root,
    load_split,
    resolve_split,
    search_dirs,
)

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
    "encode_idx",
    "load_split",
    "parse_idx",
    "read_idx",
    "resolve_split",
    "search_dirs",
]
