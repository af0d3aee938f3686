"""The measurement set: a fixed random subset of the training data, drawn once per run.

Values logged epoch after epoch must track the *model*, not resampled data, so a callback draws
its sample indices once from its own generator (``torch.Generator().manual_seed(seed)``), keeps
them in its ``state_dict`` and gathers the samples once as tensors (``as_batch_set``); inner loops
never iterate a DataLoader. Under DDP each rank takes a strided shard of the same indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from lightning_curvature.curvature import BatchSet, as_batch_set

__all__ = [
    "MeasurementSetError",
    "derive_seed",
    "draw_indices",
    "gather_samples",
    "training_dataset",
]


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. ``(seed, epoch, salt)``.

    ``numpy.random.SeedSequence`` hashes the keys, so neighbouring epochs get unrelated streams
    (``seed + epoch`` would make callbacks with seeds 0 and 1 share streams one epoch apart).
    """
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2)
    return (int(state[0]) << 31) ^ int(state[1])


def training_dataset(trainer: Any) -> Dataset:
    """The map-style dataset behind the trainer's training DataLoader.

    Raises
    ------
    ValueError
        If the training data is not a single DataLoader over an indexable (map-style) dataset.
    """
    loader = getattr(trainer, "train_dataloader", None)
    if isinstance(loader, DataLoader):
        dataset = loader.dataset
    else:
        raise MeasurementSetError(
            "the measurement set is drawn from the training data, which must be one "
            f"torch DataLoader (got {type(loader).__name__})"
        )
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise MeasurementSetError(
            "the measurement set is drawn by index from the training dataset, which must be "
            f"map-style (define __len__ and __getitem__); got {type(dataset).__name__}"
        )
    return dataset


def draw_indices(dataset_size: int, num_samples: int | None, seed: int) -> Tensor:
    """``min(num_samples, dataset_size)`` distinct indices, sorted, from a private generator."""
    if dataset_size < 1:
        raise ValueError("the training dataset is empty")
    k = dataset_size if num_samples is None else min(num_samples, dataset_size)
    generator = torch.Generator().manual_seed(derive_seed(seed, 0x5EED))
    perm = torch.randperm(dataset_size, generator=generator)
    return torch.sort(perm[:k]).values


class MeasurementSetError(ValueError):
    """The training data cannot serve as a measurement set (raised before training starts)."""


def _pair(batch: object) -> tuple[object, object]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        raise MeasurementSetError(
            "the measurement set is read from the training dataset, whose samples must be "
            f"(inputs, targets) pairs; got a dict with keys {sorted(map(str, batch))}. The engine "
            "evaluates loss_fn(pl_module(inputs), targets), so it cannot guess which entry is "
            "which: wrap the dataset so that __getitem__ returns (inputs, targets), e.g. "
            "`class Pairs(Dataset): __getitem__ = lambda s, i: (d[i]['x'], d[i]['y'])`"
        )
    shape = f"a {type(batch).__name__}"
    if isinstance(batch, (tuple, list)):
        shape += f" of {len(batch)} items"
    raise MeasurementSetError(
        "the measurement set is read from the training dataset, whose samples must be "
        f"(inputs, targets) pairs; got {shape}. Make __getitem__ return (inputs, targets)"
    )


def gather_samples(
    dataset: Dataset,
    indices: Tensor,
    *,
    batch_size: int | None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> BatchSet:
    """Read ``dataset[i]`` for every index once and stack them into batches of ``batch_size``.

    ``TensorDataset`` (and a ``Subset`` of one) is indexed directly; anything else goes through
    ``__getitem__`` and ``default_collate``. Floating-point tensors are cast to ``dtype`` (the
    model's, so ``Trainer(precision="64-true")`` measures in float64).
    """
    if len(indices) == 0:
        raise ValueError("the measurement set is empty")
    idx = indices.tolist()
    step = len(idx) if batch_size is None else batch_size
    base, lookup = dataset, idx
    if isinstance(dataset, torch.utils.data.Subset) and isinstance(dataset.dataset, TensorDataset):
        base, lookup = dataset.dataset, [dataset.indices[i] for i in idx]
    batches = []
    for start in range(0, len(idx), step):
        chunk = lookup[start : start + step]
        if isinstance(base, TensorDataset):
            rows = torch.as_tensor(chunk, dtype=torch.long)
            batch = tuple(t[rows] for t in base.tensors)
        else:
            batch = default_collate([base[i] for i in chunk])
        batches.append(_pair(batch))
    return as_batch_set(batches, device=device, dtype=dtype)
