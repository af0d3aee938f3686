"""The linear-algebra engine: HVP operators, trace estimators, Lanczos, SLQ. No Lightning import."""

from .batches import BatchSet, as_batch_set
from .functional import FunctionalLoss, NondeterministicModelError, module_mode
from .params import ParameterLayout

__all__ = [
    "BatchSet",
    "FunctionalLoss",
    "NondeterministicModelError",
    "ParameterLayout",
    "as_batch_set",
    "module_mode",
]
