"""The linear-algebra engine: HVP operators, trace estimators, Lanczos, SLQ. No Lightning import."""

from .batches import BatchSet, as_batch_set
from .density import spectral_density
from .eigen import extreme_eigenpairs, opposite_sign_eigenpair
from .functional import FunctionalLoss, NondeterministicModelError, module_mode
from .ggn import GGNOperator
from .hessian import HessianOperator
from .lanczos import lanczos
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
    "extreme_eigenpairs",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "module_mode",
    "opposite_sign_eigenpair",
    "spectral_density",
    "to_scipy",
]
