"""``CurvatureDashboard``: TensorBoard's custom-scalars layout for the curvature tags."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["CurvatureDashboard", "dashboard_layout"]


def dashboard_layout() -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout: ``{category: {chart title: [kind, tags]}}``.

    ``Margin`` charts take ``[value, lower, upper]`` tags (the callbacks log value ∓ uncertainty
    as ``*_lower`` / ``*_upper``); ``Multiline`` charts take regular expressions.
    """
    return {
        "curvature": {
            "tr H ± stderr (Hutch++)": [
                "Margin",
                ["curvature/trace", "curvature/trace_lower", "curvature/trace_upper"],
            ],
            "tr H: Hutch++ vs HVP-free projection": [
                "Multiline",
                [r"^curvature/trace$", r"^landscape/projection_trace$"],
            ],
            "λ_max and λ_min": [
                "Multiline",
                [r"^curvature/lambda_max$", r"^curvature/lambda_min$"],
            ],
            "negative eigenvalue fraction (SLQ)": [
                "Multiline",
                [r"^curvature/negative_fraction$"],
            ],
        },
        "local learning coefficient": {
            "λ̂ ± std over chains": [
                "Margin",
                ["llc/lambda_hat", "llc/lambda_hat_lower", "llc/lambda_hat_upper"],
            ],
            "WBIC": ["Multiline", [r"^llc/wbic$"]],
            "L_n(w*)": ["Multiline", [r"^llc/init_loss$"]],
        },
        "landscape": {
            "share of random planes showing the saddle": [
                "Multiline",
                [r"^landscape/random_saddle_fraction$"],
            ],
        },
        "optimizer": {
            "NGD damping κ": ["Multiline", [r"^ngd/kappa$"]],
            "NGD tr F": ["Multiline", [r"^ngd/fisher_trace$"]],
            "mean update norm": ["Multiline", [r"^optim/update_norm$"]],
        },
        "cost": {"seconds per measurement": ["Multiline", [r"^time/"]]},
    }


class CurvatureDashboard(Callback):
    """Write the custom-scalars layout (:func:`dashboard_layout`) once per run, on rank zero.

    Open TensorBoard's *Custom Scalars* tab to see trace ± stderr and λ̂ ± std as margin charts,
    λ_max with λ_min, and NGD's κ and tr F. Requires a ``TensorBoardLogger``; without one a
    warning says so and nothing is written.
    """

    def __init__(self) -> None:
        super().__init__()
        self._written: set[str] = set()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            rank_zero_warn(
                "CurvatureDashboard: no TensorBoardLogger on the Trainer; the custom-scalars "
                "layout is not written"
            )
            return
        for lg in loggers:
            if lg.log_dir in self._written:
                continue
            lg.experiment.add_custom_scalars(dashboard_layout())
            self._written.add(lg.log_dir)
