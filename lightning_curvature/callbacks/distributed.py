"""What a callback needs to know about the process group: rank, world size, a sum-reduction.

The engine's contract (``docs/architecture.md``): every estimator takes ``reduce_fn``, a function
that SUMS a tensor across processes. Each rank evaluates its shard of the measurement set
weighted by
``n_local / N_global`` and ``reduce_fn`` sums the parts, so every rank sees the same numbers and
runs the same Lanczos / trace iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor

from lightning_curvature.curvature.model_operator import ReduceFn

__all__ = ["DistributedInfo"]



def _all_reduce_sum(tensor: Tensor) -> Tensor:
    # all_reduce works in place; reduce a copy so the caller's tensor is never overwritten.
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@dataclass(frozen=True)
class DistributedInfo:
    """Rank and world size of the current process (``world_size == 1`` outside DDP)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_trainer(cls, trainer: Any) -> DistributedInfo:
        """Read rank and world size from a Lightning ``Trainer`` (falls back to single process)."""
        world = int(getattr(trainer, "world_size", 1) or 1)
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        if world > 1 and not (dist.is_available() and dist.is_initialized()):
            # A trainer that reports several processes without a process group (e.g. a mock)
            # cannot reduce: measure as a single process.
            return cls(0, 1)
        return cls(rank, world)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def reduce_fn(self) -> ReduceFn | None:
        """``all_reduce(SUM)`` under DDP, ``None`` (identity) in a single process."""
        return _all_reduce_sum if self.is_distributed else None

    def shard(self, items: Tensor) -> Tensor:
        """This rank's share of ``items`` (strided, so shards differ in size by at most one)."""
        return items[self.rank :: self.world_size]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out
