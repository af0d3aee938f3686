"""Random probe vectors drawn from an explicit generator (never the global RNG streams)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_generator", "gaussian", "rademacher"]


def as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A ``torch.Generator`` from a generator, a seed, or ``None`` (fresh, nondeterministic seed).

    Probes are drawn on the generator's device and then moved, so a CPU generator serves CUDA
    operators too.
    """
    if isinstance(generator, torch.Generator):
        return generator
    gen = torch.Generator()
    if generator is None:
        gen.seed()
    elif isinstance(generator, int) and not isinstance(generator, bool):
        gen.manual_seed(generator)
    else:
        raise ValueError(
            f"generator must be a torch.Generator, an int seed or None, got {generator!r}"
        )
    return gen


def rademacher(
    dim: int, k: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``(dim, k)`` matrix of independent ±1 entries."""
    # Drawn straight in ``dtype`` (the same stream as int64 draws) and mapped to ±1 in place.
    signs = torch.randint(0, 2, (dim, k), generator=generator, device=generator.device, dtype=dtype)
    return signs.mul_(2).sub_(1).to(device)


def gaussian(
    dim: int, k: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``(dim, k)`` matrix of independent standard normal entries (drawn in float64)."""
    z = torch.randn(dim, k, generator=generator, device=generator.device, dtype=torch.float64)
    return z.to(device=device, dtype=dtype)
