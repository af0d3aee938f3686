"""Models: :class:`MLP`, :class:`LeNet5` and the SGD/NGD :class:`ImageClassifier`.

The networks are plain ``torch.nn`` modules; only :class:`ImageClassifier` (a LightningModule) is
imported on first access, so ``from lightning_curvature.models import MLP`` works without
Lightning installed (the benchmarks' peer virtualenv).
"""

from __future__ import annotations

from lightning_curvature._lazy import lazy_exports

from .networks import ACTIVATIONS, MLP, LeNet5, make_activation, num_parameters

_LAZY = {"ImageClassifier": ".classifier"}

__all__ = ["ACTIVATIONS", "MLP", "ImageClassifier", "LeNet5", "make_activation", "num_parameters"]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)
