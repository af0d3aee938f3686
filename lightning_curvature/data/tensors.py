"""MNIST-family splits as normalized tensors, with numpy and torch only (no Lightning).

For scripts, notebooks and benchmarks that want the data module's exact preprocessing without a
Trainer: ``x = (p - mean) / std`` with ``p`` the pixel in [0, 1], shape ``(N, 1, 28, 28)``
float32, labels int64.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from lightning_curvature.checks import check_choice

from .sources import DATASETS, DatasetSpec, load_split

__all__ = ["load_tensors", "normalize", "pixels_to_unit"]


def pixels_to_unit(images: np.ndarray) -> Tensor:
    """Pixels as float32 in [0, 1]: integers are divided by 255, floats kept as they are.

    Floating-point IDX images are taken to be already scaled to [0, 1]
    (:func:`~lightning_curvature.data.sources.check_values` refuses other ranges), so they are
    not divided by 255 a second time.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    if np.issubdtype(images.dtype, np.floating):
        return x
    return x.div_(255.0)


def normalize(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec) -> tuple[Tensor, Tensor]:
    """``((p - spec.mean) / spec.std)[:, None]`` as float32 and the labels as int64."""
    x = pixels_to_unit(images).sub_(spec.mean).div_(spec.std).unsqueeze(1)
    return x, torch.from_numpy(np.asarray(labels).astype(np.int64))


def load_tensors(
    dataset: str = "fashion_mnist",
    split: str = "train",
    num: int | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    verify_checksums: bool = True,
) -> tuple[Tensor, Tensor]:
    """The first ``num`` items of one official split, normalized as the data module does.

    Parameters
    ----------
    dataset : {"mnist", "fashion_mnist", "fashion_mnist_sample"}
    split : {"train", "test"}
    num : int, optional
        Keep only the first ``num`` items (file order; no train/val permutation).
    data_dir, download, verify_checksums
        As for :func:`~lightning_curvature.data.sources.load_split` (lookup order, download,
        checksums); downloading is off by default here.
    """
    check_choice("dataset", dataset, sorted(DATASETS))
    spec = DATASETS[dataset]
    images, labels = load_split(
        spec, split, data_dir=data_dir, download=download, verify_checksums=verify_checksums
    )
    if num is not None:
        images, labels = images[:num], labels[:num]
    return normalize(images, labels, spec)
