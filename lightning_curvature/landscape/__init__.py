"""Loss-landscape projections: random vs Hessian directions, surfaces, projection curvature.

* :func:`random_directions` — Gaussian directions with filter/layer normalization (Li et al.).
* :func:`hessian_directions` — eigenvectors of λ_max and λ_min (engine's Lanczos).
* :func:`loss_surface` — the loss on a 1-D/2-D grid, batched, via ``functional_call``.
* :func:`evaluate_points`, :func:`evaluate_with_center` — losses at points of a subspace (a
  Linear/conv first layer evaluated once per direction where the model allows, ``stem``).
* :func:`projection_curvatures` — what random 2-D projections of H see (saddle fraction, trace).
* :func:`projection_trace_hvp_free` — tr H from quadratic fits, forward passes only.
* :func:`plot_surfaces`, :func:`plot_slices`, :func:`save_animation` — matplotlib figures.
"""

from .directions import HessianDirections, hessian_directions, random_directions
from .evaluation import PointEvaluation, evaluate_points, evaluate_with_center
from .figures import plot_slices, plot_surfaces, save_animation
from .projection import (
    ProjectionCurvatures,
    ProjectionTrace,
    projection_curvatures,
    projection_trace_hvp_free,
)
from .surface import LossSurface, loss_surface

__all__ = [
    "HessianDirections",
    "LossSurface",
    "PointEvaluation",
    "ProjectionCurvatures",
    "ProjectionTrace",
    "evaluate_points",
    "evaluate_with_center",
    "hessian_directions",
    "loss_surface",
    "plot_slices",
    "plot_surfaces",
    "projection_curvatures",
    "projection_trace_hvp_free",
    "random_directions",
    "save_animation",
]
