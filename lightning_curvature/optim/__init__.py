"""Natural-gradient descent with trace-scaled damping (``NGD``) and its per-sample machinery.

No Lightning import: the optimizer works in a plain PyTorch loop and under Lightning automatic
optimization alike.
"""

from .ngd import NGD

__all__ = ["NGD"]
