"""Lightning callbacks that measure loss-landscape geometry during training.

Thin glue over the engine layers: each callback chooses the data (a fixed measurement set drawn
once from the training set), calls the engine and logs under the tags of ``DESIGN.md``.

- :class:`HessianTrace` — ``curvature/trace`` ± ``curvature/trace_stderr`` (Hutch++).
- :class:`HessianEigenvalues` — ``curvature/lambda_max``, ``curvature/lambda_min`` (Lanczos).
- :class:`HessianSpectrum` — ``curvature/negative_fraction``, ``curvature/spectrum`` (SLQ).
- :class:`LocalLearningCoefficient` — ``llc/lambda_hat`` ± std, ``llc/wbic``, ``llc/init_loss``.
- :class:`LossProjection` — ``landscape/hessian`` vs ``landscape/random`` heat maps, saddle
  fraction, HVP-free trace, ``.npz`` snapshots.
- :class:`OptimizerMonitor` — ``optim/update_norm``, ``ngd/kappa``, ``ngd/fisher_trace``.
- :class:`CurvatureDashboard` — TensorBoard custom-scalars layout.
- :func:`default_callbacks` — the full suite at its defaults.
"""

from .base import CurvatureCallback, Measurement, MeasurementContext
from .dashboard import CurvatureDashboard, dashboard_layout
from .eigenvalues import HessianEigenvalues
from .llc import LocalLearningCoefficient
from .optimizer_monitor import OptimizerMonitor
from .projection import LossProjection
from .spectrum import HessianSpectrum
from .trace import HessianTrace

__all__ = [
    "CurvatureCallback",
    "CurvatureDashboard",
    "HessianEigenvalues",
    "HessianSpectrum",
    "HessianTrace",
    "LocalLearningCoefficient",
    "LossProjection",
    "Measurement",
    "MeasurementContext",
    "OptimizerMonitor",
    "dashboard_layout",
    "default_callbacks",
]


def default_callbacks(**shared: object) -> list:
    """The full suite at its defaults; ``shared`` kwargs (e.g. ``seed``) go to each measurer."""
    measuring = [
        HessianTrace,
        HessianEigenvalues,
        HessianSpectrum,
        LocalLearningCoefficient,
        LossProjection,
    ]
    return [cls(**shared) for cls in measuring] + [OptimizerMonitor(), CurvatureDashboard()]
