"""Measurement data: one ``(inputs, targets)`` batch or an iterable of them, gathered once.

The contract (``docs/architecture.md``): the loss over a measurement set is the
sample-weighted mean over all its samples, whatever the batch split. :class:`BatchSet` holds the
batches as tensors on the target device together with their weights ``n_b / N``, so inner loops
(HVPs, SGLD steps, grid points) never iterate a ``DataLoader`` again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Batch", "BatchSet", "as_batch_set", "batch_size_of"]

Batch = tuple[object, object]


def batch_size_of(inputs: object) -> int:
    """Number of samples in ``inputs`` (a tensor, or a tuple/list/dict whose first tensor leads)."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ValueError("inputs must have a leading sample dimension, got a 0-d tensor")
        return int(inputs.shape[0])
    if isinstance(inputs, (list, tuple)) and inputs:
        return batch_size_of(inputs[0])
    if isinstance(inputs, dict) and inputs:
        return batch_size_of(next(iter(inputs.values())))
    raise TypeError(f"cannot tell the number of samples of inputs of type {type(inputs).__name__}")


def _to(obj: object, device: torch.device | None, dtype: torch.dtype | None) -> object:
    if isinstance(obj, Tensor):
        if dtype is not None and obj.is_floating_point():
            obj = obj.to(dtype=dtype)
        return obj.to(device) if device is not None else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _is_single_batch(data: object) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
    )


@dataclass
class BatchSet:
    """Batches gathered once, with the weights that make their losses a per-sample mean.

    Attributes
    ----------
    batches : list of (inputs, targets)
        Tensors already on the target device.
    sizes : list of int
        Samples per batch.
    num_samples : int
        Total number of samples ``N``.
    """

    batches: list[Batch]
    sizes: list[int]
    num_samples: int

    @property
    def weights(self) -> list[float]:
        """``n_b / N`` for each batch: the factor that turns batch-mean losses into the set mean."""
        return [s / self.num_samples for s in self.sizes]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def weighted(self) -> Iterator[tuple[Batch, float]]:
        """Yield ``(batch, n_b / N)`` pairs."""
        yield from zip(self.batches, self.weights, strict=True)

    def merged(self, max_samples: int | None = None) -> BatchSet:
        """One batch holding every sample (tensor inputs/targets only), or ``self`` if impossible.

        Used to run one forward pass over data that fits in memory. ``max_samples`` caps the size
        of a merged batch; above it the set is returned as is.
        """
        if len(self.batches) <= 1:
            return self
        if max_samples is not None and self.num_samples > max_samples:
            return self
        xs, ys = zip(*self.batches, strict=True)
        if not all(isinstance(x, Tensor) for x in xs) or not all(isinstance(y, Tensor) for y in ys):
            return self
        return BatchSet([(torch.cat(xs), torch.cat(ys))], [self.num_samples], self.num_samples)

    def to(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> BatchSet:
        """Move (and optionally cast floating-point tensors of) every batch."""
        return BatchSet(
            [_to(b, device, dtype) for b in self.batches], list(self.sizes), self.num_samples
        )


def as_batch_set(
    data: object,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_batches: int | None = None,
) -> BatchSet:
    """Gather ``data`` once into a :class:`BatchSet`.

    Parameters
    ----------
    data : (inputs, targets) or iterable of them or BatchSet
        One batch, a list of batches, or a ``DataLoader`` (iterated once).
    device : torch.device, optional
        Move every tensor here.
    dtype : torch.dtype, optional
        Cast floating-point tensors (inputs, and float targets) to this dtype.
    max_batches : int, optional
        Take only the first ``max_batches`` batches of an iterable.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    device = torch.device(device) if isinstance(device, str) else device
    if isinstance(data, BatchSet):
        return data.to(device, dtype)
    if _is_single_batch(data):
        raw: list = [tuple(data)]
    else:
        try:
            iterator = iter(data)  # type: ignore[call-overload]
        except TypeError as err:
            raise TypeError(
                "data must be an (inputs, targets) batch or an iterable of such batches, "
                f"got {type(data).__name__}"
            ) from err
        raw = []
        for k, item in enumerate(iterator):
            if max_batches is not None and k >= max_batches:
                break
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError(
                    f"batch {k} is not an (inputs, targets) pair (got {type(item).__name__})"
                )
            raw.append((item[0], item[1]))
    if not raw:
        raise ValueError("data is empty: the measurement set needs at least one batch")
    batches = [(_to(x, device, dtype), _to(y, device, dtype)) for x, y in raw]
    sizes = [batch_size_of(x) for x, _ in batches]
    if any(s == 0 for s in sizes):
        raise ValueError("data contains an empty batch")
    return BatchSet(batches, sizes, sum(sizes))
