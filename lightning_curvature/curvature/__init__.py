"""The linear-algebra engine: HVP operators, trace estimators, Lanczos, SLQ. No Lightning import."""

from .batches import BatchSet, as_batch_set
from .blocks import parameter_blocks
from .decomposition import SpectrumDecomposition, decomposition_traces, spectrum_decomposition
from .density import spectral_density
from .eigen import (
    block_extreme_eigenpairs,
    extreme_eigenpairs,
    extreme_ritz_pairs,
    opposite_sign_eigenpair,
)
from .functional import FunctionalLoss, LossFn, NondeterministicModelError, module_mode
from .ggn import GGNOperator
from .hessian import HessianOperator
from .lanczos import lanczos, parallel_lanczos
from .model_operator import ReduceFn
from .operators import (
    CurvatureOperator,
    DenseOperator,
    IdentityOperator,
    OperatorLike,
    RestrictedOperator,
    ScaledOperator,
    SumOperator,
    as_operator,
    to_scipy,
)
from .params import ParameterLayout
from .results import (
    BlockTrace,
    ExtremeEigenpairs,
    LanczosResult,
    OppositeSignEigenpair,
    SpectralDensity,
    SpectralIndex,
    TraceEstimate,
)
from .trace import hutchinson_trace, hutchpp_trace, krylov_deflated_trace

__all__ = [
    "BatchSet",
    "BlockTrace",
    "IdentityOperator",
    "LossFn",
    "OperatorLike",
    "ReduceFn",
    "RestrictedOperator",
    "ScaledOperator",
    "SpectralIndex",
    "SpectrumDecomposition",
    "SumOperator",
    "as_operator",
    "block_extreme_eigenpairs",
    "parallel_lanczos",
    "parameter_blocks",
    "spectrum_decomposition",
    "decomposition_traces",
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
    "extreme_ritz_pairs",
    "hutchinson_trace",
    "hutchpp_trace",
    "krylov_deflated_trace",
    "lanczos",
    "module_mode",
    "opposite_sign_eigenpair",
    "spectral_density",
    "to_scipy",
]
