"""Models: :class:`MLP`, :class:`LeNet5` and the SGD/NGD :class:`ImageClassifier`.

The networks are plain ``torch.nn`` modules; only :class:`ImageClassifier` (a LightningModule) is
imported on first access, so ``from lightning_curvature.models import MLP`` works without
Lightning installed (the benchmarks' peer virtualenv).
"""

from __future__ import annotations

import importlib
from typing import Any

from .networks import ACTIVATIONS, MLP, LeNet5, make_activation, num_parameters

_LAZY = {"ImageClassifier": ".classifier"}

__all__ = ["ACTIVATIONS", "MLP", "ImageClassifier", "LeNet5", "make_activation", "num_parameters"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
