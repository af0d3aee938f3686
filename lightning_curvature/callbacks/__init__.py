"""Lightning callbacks that measure loss-landscape geometry during training.

Thin glue over the engine layers: each callback chooses the data (a fixed measurement set drawn
once from the training set), calls the engine and logs under the tags of
``docs/architecture.md``. The
curvature callbacks on one Trainer share one measurement per epoch (measurement set, Hessian
operator, Lanczos run: :mod:`.shared`), so every number of an epoch describes the same Hessian.

- :class:`HessianTrace` — ``curvature/trace`` ± ``curvature/trace_stderr`` (Krylov-deflated
  Hutchinson on the shared Lanczos basis, or Hutch++) and ``curvature/trace_layer/<name>``.
- :class:`HessianEigenvalues` — ``curvature/lambda_max``, ``curvature/lambda_min`` (Lanczos).
- :class:`HessianSpectrum` — ``curvature/negative_fraction``, ``curvature/spectrum`` (SLQ).
- :class:`HessianDecomposition` — ``curvature/spectrum_decomposition`` (spectra of H, its
  Gauss–Newton part and the residual) and ``curvature/decomposition/trace_*`` (opt-in).
- :class:`LocalLearningCoefficient` — ``llc/lambda_hat`` ± std, ``llc/wbic``, ``llc/init_loss``.
- :class:`LossProjection` — ``landscape/hessian`` vs ``landscape/random`` loss maps, saddle
  fraction, HVP-free trace (with its radius), ``.npz`` snapshots.
- :class:`OptimizerMonitor` — ``optim/update_norm``, ``ngd/kappa``, ``ngd/fisher_trace``.
- :class:`CurvatureDashboard` — TensorBoard custom-scalars layout.
- :func:`default_callbacks` — the full suite at its defaults.
"""

from .base import CurvatureCallback, Measurement, MeasurementContext, MeasurementError
from .contract import LossContractError
from .dashboard import CurvatureDashboard, dashboard_layout
from .decomposition import HessianDecomposition
from .eigenvalues import HessianEigenvalues
from .llc import LocalLearningCoefficient
from .optimizer_monitor import OptimizerMonitor
from .projection import LossProjection
from .shared import EpochMeasurement, MeasurementStore
from .spectrum import HessianSpectrum
from .trace import HessianTrace

__all__ = [
    "CurvatureCallback",
    "CurvatureDashboard",
    "EpochMeasurement",
    "HessianDecomposition",
    "HessianEigenvalues",
    "HessianSpectrum",
    "HessianTrace",
    "LocalLearningCoefficient",
    "LossContractError",
    "LossProjection",
    "Measurement",
    "MeasurementContext",
    "MeasurementError",
    "MeasurementStore",
    "OptimizerMonitor",
    "dashboard_layout",
    "default_callbacks",
]


def default_callbacks(**shared: object) -> list:
    """The full suite at its defaults; ``shared`` kwargs (e.g. ``seed``) go to each measurer.

    The defaults share one measurement set (256 samples; the LLC's 4096 contain them) and their
    cadences are multiples of 2, so every measured epoch reads one Lanczos run.
    """
    measuring = [
        HessianTrace,
        HessianEigenvalues,
        HessianSpectrum,
        LocalLearningCoefficient,
        LossProjection,
    ]
    return [cls(**shared) for cls in measuring] + [OptimizerMonitor(), CurvatureDashboard()]
