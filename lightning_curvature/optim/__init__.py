"""Natural-gradient optimizers: the exact ``NGD`` (trace-scaled damping, Woodbury solve) and
Kaldi's ``OnlineNGD`` (per-axis online Fisher factors, the method seed 002 used).

No Lightning import: both work in a plain PyTorch loop and under Lightning automatic
optimization alike.
"""

from .ngd import NGD
from .online_ngd import OnlineNGD

__all__ = ["NGD", "OnlineNGD"]
