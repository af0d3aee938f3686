"""MNIST / Fashion-MNIST as a LightningDataModule with tensors gathered once.

Images are scaled to [0, 1] and standardized with the training-set statistics
``x = (p / 255 - mean) / std`` (MNIST: mean 0.1307, std 0.3081; Fashion-MNIST: mean 0.2860,
std 0.3530), shape ``(N, 1, 28, 28)`` float32; labels are int64.
The official training images (60k; 4k in the sample) are split once into train and validation
by a seeded permutation (``val_size`` images for validation); the official test split is the
test set.
The shuffling order of epoch ``e`` depends only on ``(seed, e)``, so a run resumed from a
checkpoint (or a split-run branch) sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ..checks import check_bool, check_choice, check_int, check_seed
from .sources import DATASETS, DatasetSpec, Downloader, load_split, resolve_split
from .tensors import normalize

__all__ = ["EpochShuffleSampler", "MNISTDataModule", "TensorBatchDataset"]

class TensorBatchDataset(TensorDataset):
    """A :class:`TensorDataset` that serves a whole batch by one tensor index.

    ``DataLoader`` calls ``__getitems__`` with the batch's indices when it exists; indexing the
    stored tensors once per batch avoids collating ``batch_size`` samples one by one.
    """

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def _collate_batch(batch: tuple[Tensor, ...]) -> list[Tensor]:
    # The batch is already stacked by TensorBatchDataset.__getitems__.
    return list(batch)


class EpochShuffleSampler(Sampler[int]):
    """Random order that depends only on ``(seed, epoch)`` (Lightning calls :meth:`set_epoch`)."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


class MNISTDataModule(pl.LightningDataModule):
    """MNIST or Fashion-MNIST, read from local IDX files or downloaded and verified.

    Parameters
    ----------
    dataset : {"mnist", "fashion_mnist", "fashion_mnist_sample"}
        ``fashion_mnist_sample``: the 4,000 / 1,000-image sample shipped in the package
        (:mod:`lightning_curvature.data.packaged`; works offline with no data folder).
    data_dir : str, optional
        Folder searched first (see :mod:`lightning_curvature.data.sources` for the lookup order:
        ``data_dir``, ``$LIGHTNING_CURVATURE_DATA``, the user cache, ``/usr/share/datasets``,
        then a download).
    batch_size : int
        Training and evaluation batch size.
    val_size : int
        Images of the official training split (60k; 4k for the sample) held out for
        validation (0 disables validation).
    train_subset : int, optional
        Use only this many training images (the first of the seeded permutation after the
        validation images), e.g. for quick runs.
    num_workers : int
        DataLoader workers (0: load in the main process; the tensors are in memory anyway).
    seed : int
        Seeds the train/val split and the per-epoch shuffling.
    download : bool
        Download missing files from the official mirrors into the user cache.
    verify_checksums : bool
        Check local files against the official decompressed-bytes checksums (disable to use a
        modified copy; structure is always checked).
    val_subset, test_subset : int, optional
        Evaluate on only the first this-many validation / test images.

    Attributes
    ----------
    train_tensors, val_tensors, test_tensors : tuple of Tensor
        ``(images, labels)`` of each split after :meth:`setup` (for callbacks and notebooks).
    """

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        train_subset: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = True,
        verify_checksums: bool = True,
        val_subset: int | None = None,
        test_subset: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("dataset", dataset, DATASETS)
        train_size = DATASETS[dataset].train_size
        check_int("batch_size", batch_size, minimum=1)
        check_int("val_size", val_size, minimum=0, maximum=train_size - 1)
        # The upper bound is the dataset's training images minus the validation ones.
        check_int("train_subset", train_subset, minimum=1, maximum=train_size - val_size,
                  allow_none=True)  # fmt: skip
        check_int("val_subset", val_subset, minimum=1, allow_none=True)
        check_int("test_subset", test_subset, minimum=1, allow_none=True)
        check_int("num_workers", num_workers, minimum=0)
        check_seed("seed", seed)
        check_bool("download", download)
        check_bool("verify_checksums", verify_checksums)
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.train_subset = train_subset
        self.num_workers = num_workers
        self.seed = seed
        self.download = download
        self.verify_checksums = verify_checksums
        self.val_subset = val_subset
        self.test_subset = test_subset
        #: ``downloader(url, timeout) -> bytes``; replace to mock the network (tests).
        self.downloader: Downloader | None = None
        self.train_tensors: tuple[Tensor, Tensor] | None = None
        self.val_tensors: tuple[Tensor, Tensor] | None = None
        self.test_tensors: tuple[Tensor, Tensor] | None = None

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.dataset]

    @property
    def num_classes(self) -> int:
        return len(self.spec.classes)

    def _load(self, split: str) -> tuple:
        return load_split(
            self.spec,
            split,
            data_dir=self.data_dir,
            download=self.download,
            verify_checksums=self.verify_checksums,
            downloader=self.downloader,
        )

    def _normalize(self, images, labels) -> tuple[Tensor, Tensor]:
        return normalize(images, labels, self.spec)

    def _splits_for(self, stage: str | None) -> list[str]:
        if stage in ("fit", "validate"):
            return ["train"]
        if stage in ("test", "predict"):
            return ["test"]
        return ["train", "test"]

    def prepare_data(self) -> None:
        """Locate (or download, on one process) the files the coming stage needs."""
        trainer = getattr(self, "trainer", None)
        stage = trainer.state.fn.value if trainer is not None and trainer.state.fn else None
        for split in self._splits_for(stage):
            resolve_split(
                self.spec,
                split,
                data_dir=self.data_dir,
                download=self.download,
                downloader=self.downloader,
            )

    def setup(self, stage: str | None = None) -> None:
        """Read the IDX files, normalize, split train/val (seeded)."""
        splits = self._splits_for(stage)
        if "train" in splits and self.train_tensors is None:
            x, y = self._normalize(*self._load("train"))
            if x.shape[0] <= self.val_size:
                raise ValueError(
                    f"val_size={self.val_size} leaves no training images out of {x.shape[0]}"
                )
            g = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(x.shape[0], generator=g)
            val_idx = perm[: self.val_size]
            train_idx = perm[self.val_size :]
            if self.train_subset is not None:
                train_idx = train_idx[: self.train_subset]
            if self.val_subset is not None:
                val_idx = val_idx[: self.val_subset]
            self.train_tensors = (x[train_idx], y[train_idx])
            self.val_tensors = (x[val_idx], y[val_idx])
        if "test" in splits and self.test_tensors is None:
            x, y = self._normalize(*self._load("test"))
            if self.test_subset is not None:
                x, y = x[: self.test_subset], y[: self.test_subset]
            self.test_tensors = (x, y)

    # Datasets (TensorDataset subclasses) for code that wants them.
    @property
    def train_dataset(self) -> TensorBatchDataset:
        return TensorBatchDataset(*self._require("train_tensors"))

    @property
    def val_dataset(self) -> TensorBatchDataset:
        return TensorBatchDataset(*self._require("val_tensors"))

    @property
    def test_dataset(self) -> TensorBatchDataset:
        return TensorBatchDataset(*self._require("test_tensors"))

    def _require(self, name: str) -> tuple[Tensor, Tensor]:
        tensors = getattr(self, name)
        if tensors is None:
            raise RuntimeError(f"{name} is not loaded: call setup() first")
        return tensors

    def _loader(self, dataset: TensorBatchDataset, sampler: Sampler | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate_batch,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset
        return self._loader(ds, EpochShuffleSampler(len(ds), seed=self.seed))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_size == 0:
            return []
        return self._loader(self.val_dataset, None)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, None)

    def __repr__(self) -> str:
        where = self.data_dir or os.environ.get("LIGHTNING_CURVATURE_DATA") or "<search path>"
        return f"MNISTDataModule(dataset={self.dataset!r}, data_dir={where!r})"
