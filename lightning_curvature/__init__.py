"""lightning-curvature: loss-landscape geometry measured during training.

Subpackages (lower layers never import higher ones):

- :mod:`lightning_curvature.curvature`: HVP operators, trace estimators, Lanczos, SLQ.
- :mod:`lightning_curvature.sampling`: SGLD, local learning coefficient, WBIC.
- :mod:`lightning_curvature.landscape`: directions, loss surfaces, projection curvature, figures.
- :mod:`lightning_curvature.optim`: the NGD optimizer.
- :mod:`lightning_curvature.callbacks`: Lightning callbacks and the TensorBoard layout.
- :mod:`lightning_curvature.data`, :mod:`lightning_curvature.models`: MNIST-family data and models.
"""

__version__ = "0.1.0"
