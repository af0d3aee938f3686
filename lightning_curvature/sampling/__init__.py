"""SGLD sampling of the localized tempered posterior: the local learning coefficient and WBIC.

No Lightning import. Entry points: :func:`estimate_llc` (-> :class:`LLCEstimate`) and
:func:`calibrate_sgld` (-> :class:`SGLDCalibration`).
"""

from .calibration import SGLDCalibration, calibrate_sgld
from .diagnostics import divergence_threshold, geweke_z, split_r_hat
from .llc import GEWEKE_THRESHOLD, R_HAT_THRESHOLD, LLCEstimate, default_nbeta, estimate_llc
from .sgld import ChainTraces, chain_generators, minibatch_indices, run_sgld_chains

__all__ = [
    "GEWEKE_THRESHOLD",
    "R_HAT_THRESHOLD",
    "ChainTraces",
    "LLCEstimate",
    "SGLDCalibration",
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
