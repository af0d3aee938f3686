"""The linear-algebra engine: HVP operators, trace estimators, Lanczos, SLQ. No Lightning import."""

from .batches import BatchSet, as_batch_set
from .functional import FunctionalLoss, NondeterministicModelError, module_mode
from .ggn import GGNOperator
from .hessian import HessianOperator
from .operators import CurvatureOperator, DenseOperator, to_scipy
from .params import ParameterLayout
from .results import (
    ExtremeEigenpairs,
    LanczosResult,
    OppositeSignEigenpair,
    SpectralDensity,
    TraceEstimate,
)
from .trace import hutchinson_trace, hutchpp_trace

__all__ = [
    "BatchSet",
    "CurvatureOperator",
    "DenseOperator",
    "ExtremeEigenpairs",
    "FunctionalLoss",
    "GGNOperator",
    "HessianOperator",
    "LanczosResult",
    "NondeterministicModelError",
    "OppositeSignEigenpair",
    "ParameterLayout",
    "SpectralDensity",
    "TraceEstimate",
    "as_batch_set",
    "hutchinson_trace",
    "hutchpp_trace",
    "module_mode",
    "to_scipy",
]
