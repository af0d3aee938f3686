"""The linear-algebra engine: HVP operators, trace estimators, Lanczos, SLQ. No Lightning import."""

from .batches import BatchSet, as_batch_set
from .functional import FunctionalLoss, NondeterministicModelError, module_mode
from .ggn import GGNOperator
from .hessian import HessianOperator
from .operators import CurvatureOperator, DenseOperator, to_scipy
from .params import ParameterLayout

__all__ = [
    "BatchSet",
    "CurvatureOperator",
    "DenseOperator",
    "FunctionalLoss",
    "GGNOperator",
    "HessianOperator",
    "NondeterministicModelError",
    "ParameterLayout",
    "as_batch_set",
    "module_mode",
    "to_scipy",
]
