"""The side-effect guard: a measurement must leave training exactly as it found it.

The contract (``docs/architecture.md``, no side effects on training): parameters, buffers,
``.grad``,
optimizer state, the model's train/eval mode and every global RNG stream are unchanged by a
monitoring callback, so training with and without the callbacks gives bitwise-identical weights.

The engine already evaluates the model through ``torch.func.functional_call`` and never writes
parameters or buffers. What a measurement can still disturb, and this guard restores, is:

- the global RNG streams (torch CPU, every initialised CUDA device, numpy, python ``random``):
  a dataset transform, a dropout layer measured in train mode or a third-party routine may draw
  from them, and DataLoader shuffling and dropout in the *next* training step read them;
- the ``training`` flag of every submodule;
- the ``.grad`` attribute of every parameter (a stray ``backward`` would accumulate into it).

It also sets up the numerical context a measurement needs whatever the trainer's defaults are:
autograd on (``Trainer(inference_mode=True)`` may have left inference mode active around a hook)
and autocast off, so curvature is measured in the parameters' own (full) precision under AMP.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_curvature.curvature import module_mode

__all__ = ["RNGState", "measurement_context"]


@dataclass
class RNGState:
    """A snapshot of every global random stream a training loop reads."""

    torch_cpu: Tensor
    torch_cuda: list[Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def capture(cls) -> RNGState:
        """Snapshot the current global streams (CUDA only if it has been initialised)."""
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.get_rng_state_all()
        # Saving numpy's legacy global stream is the point here, hence the NPY002 waivers.
        legacy = np.random.get_state()  # noqa: NPY002
        return cls(torch.get_rng_state(), cuda, legacy, random.getstate())

    def restore(self) -> None:
        """Put every stream back to the captured state."""
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)  # noqa: NPY002
        random.setstate(self.python)


def _device_types(module: nn.Module) -> set[str]:
    types = {p.device.type for p in module.parameters()}
    return types or {"cpu"}


@contextmanager
def measurement_context(module: nn.Module) -> Iterator[None]:
    """Run a measurement with no lasting effect on ``module`` or the global RNG streams.

    Inside the block: grad mode on, inference mode off, autocast disabled for every device type
    the module lives on. On exit (normal or exception): RNG streams, submodule train/eval flags
    and the ``.grad`` attribute of every parameter are restored.

    Parameters
    ----------
    module : nn.Module
        The model being measured (typically the LightningModule).
    """
    rng = RNGState.capture()
    grads = [(p, p.grad) for p in module.parameters()]
    with ExitStack() as stack:
        stack.enter_context(module_mode(module, None))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device_type in _device_types(module):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        try:
            yield
        finally:
            for p, g in grads:
                if p.grad is not g:
                    p.grad = g
            rng.restore()
