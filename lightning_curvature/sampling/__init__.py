"""SGLD sampling of the localized tempered posterior: the local learning coefficient and WBIC.

No Lightning import. Entry points: :func:`estimate_llc` (-> :class:`LLCEstimate`, with nested
:class:`SGLDSettings`, :class:`LLCTraces`, :class:`LLCDiagnostics`, :class:`LLCCost`) and
:func:`calibrate_sgld` (-> :class:`SGLDCalibration` of :class:`CalibrationRow`).
"""

from .calibration import CalibrationRow, SGLDCalibration, calibrate_sgld
from .diagnostics import divergence_threshold, geweke_z, split_r_hat
from .llc import estimate_llc
from .result import (
    DRIFT_TOLERANCE,
    GEWEKE_THRESHOLD,
    R_HAT_THRESHOLD,
    LLCCost,
    LLCDiagnostics,
    LLCEstimate,
    LLCTraces,
    SGLDSettings,
    default_nbeta,
)
from .sgld import ChainTraces, chain_generators, minibatch_indices, run_sgld_chains

__all__ = [
    "DRIFT_TOLERANCE",
    "GEWEKE_THRESHOLD",
    "R_HAT_THRESHOLD",
    "CalibrationRow",
    "ChainTraces",
    "LLCCost",
    "LLCDiagnostics",
    "LLCEstimate",
    "LLCTraces",
    "SGLDCalibration",
    "SGLDSettings",
    "calibrate_sgld",
    "chain_generators",
    "default_nbeta",
    "divergence_threshold",
    "estimate_llc",
    "geweke_z",
    "minibatch_indices",
    "run_sgld_chains",
    "split_r_hat",
]
