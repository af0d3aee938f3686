"""``CurvatureDashboard``: TensorBoard's custom-scalars layout for the curvature tags.

One chart per quantity (a chart with several lines is unreadable without hovering, because the
custom-scalars tab shows no legend), margin charts for value ± uncertainty, the helper tags
(``bands/…``, ``diagnostics/…``) kept out of the quantity groups, and charts only for what the
Trainer actually measures: the layout is built from its callbacks (named instances get their
own charts) and NGD charts appear only when an NGD optimizer is present. x-axis: the epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from .base import CurvatureCallback
from .eigenvalues import HessianEigenvalues
from .llc import LocalLearningCoefficient
from .optimizer_monitor import OptimizerMonitor
from .projection import LossProjection
from .spectrum import HessianSpectrum
from .trace import HessianTrace

__all__ = ["CurvatureDashboard", "dashboard_layout"]

Chart = list[Any]
Layout = dict[str, dict[str, Chart]]


def _line(tag: str) -> Chart:
    return ["Multiline", [f"^{tag}$"]]


def _margin(value: str, lower: str, upper: str) -> Chart:
    return ["Margin", [value, lower, upper]]


def _charts(cb: CurvatureCallback) -> dict[str, dict[str, Chart]]:
    """``{category: {title: chart}}`` for one measuring callback (its tags via ``cb.tag``)."""
    t = cb.tag
    suffix = "" if cb.label is None else f" [{cb.label}]"
    if isinstance(cb, HessianTrace):
        charts = {
            f"tr H ± stderr{suffix}": _margin(
                t("curvature/trace"),
                t("bands/curvature/trace_lower"),
                t("bands/curvature/trace_upper"),
            )
        }
        if cb.per_layer:  # one line per parameter tensor (a regular expression over the tags)
            end = "" if cb.label is None else f"/{cb.label}"
            charts[f"tr H per parameter tensor{suffix}"] = [
                "Multiline",
                [f"^curvature/trace_layer/.*{end}$"],
            ]
        return {"curvature": charts}
    if isinstance(cb, HessianEigenvalues):
        return {
            "curvature": {
                f"λ_max, largest Hessian eigenvalue{suffix}": _line(t("curvature/lambda_max")),
                f"λ_min, smallest Hessian eigenvalue{suffix}": _line(t("curvature/lambda_min")),
            }
        }
    if isinstance(cb, HessianSpectrum):
        return {
            "curvature": {
                f"Hessian index: share of eigenvalues below −τ (SLQ){suffix}": _line(
                    t("curvature/negative_fraction")
                ),
                f"τ, resolution of the index{suffix}": _line(t("curvature/negative_fraction_tau")),
            }
        }
    if isinstance(cb, LocalLearningCoefficient):
        return {
            "local learning coefficient": {
                f"λ̂ ± std over chains{suffix}": _margin(
                    t("llc/lambda_hat"),
                    t("bands/llc/lambda_hat_lower"),
                    t("bands/llc/lambda_hat_upper"),
                ),
                f"WBIC{suffix}": _line(t("llc/wbic")),
                f"L_n(w*), loss at the weights{suffix}": _line(t("llc/init_loss")),
                f"w* not a minimum (1: chains found lower loss){suffix}": _line(
                    t("llc/not_minimum")
                ),
            }
        }
    if isinstance(cb, LossProjection):
        return {
            "landscape": {
                f"share of random planes showing the saddle{suffix}": _line(
                    t("landscape/random_saddle_fraction")
                ),
                f"tr H from projection fits (HVP-free, depends on its radius){suffix}": _margin(
                    t("landscape/projection_trace"),
                    t("bands/landscape/projection_trace_lower"),
                    t("bands/landscape/projection_trace_upper"),
                ),
            }
        }
    return {}


def _default_suite() -> list[Callback]:
    return [
        HessianTrace(),
        HessianEigenvalues(),
        HessianSpectrum(),
        LocalLearningCoefficient(),
        LossProjection(),
        OptimizerMonitor(),
    ]


def dashboard_layout(callbacks: Sequence[Callback] | None = None, *, ngd: bool = True) -> Layout:
    """The custom-scalars layout: ``{category: {chart title: [kind, tags]}}``.

    Parameters
    ----------
    callbacks : sequence of Callback, optional
        The Trainer's callbacks; charts are made for the measuring ones present. Default: the
        full suite of :func:`~lightning_curvature.callbacks.default_callbacks`.
    ngd : bool
        Include the NGD charts (``ngd/kappa``, ``ngd/fisher_trace``).

    ``Margin`` charts take ``[value, lower, upper]`` tags (the callbacks log value ∓ uncertainty
    as ``bands/<tag>_lower`` / ``_upper``); ``Multiline`` charts take regular expressions.
    """
    present = list(_default_suite() if callbacks is None else callbacks)
    layout: Layout = {}
    for cb in present:
        if isinstance(cb, CurvatureCallback):
            for category, charts in _charts(cb).items():
                layout.setdefault(category, {}).update(charts)
    if any(isinstance(cb, OptimizerMonitor) for cb in present):
        optimizer = {"mean update norm ‖θ_{t+1} − θ_t‖": _line("optim/update_norm")}
        if ngd:
            optimizer["NGD damping κ"] = _line("ngd/kappa")
            optimizer["NGD Fisher trace tr F"] = _line("ngd/fisher_trace")
        layout["optimizer"] = optimizer
    cost = {
        f"seconds per measurement: {cb.name}": _line(cb.time_tag)
        for cb in present
        if isinstance(cb, CurvatureCallback)
    }
    if cost:
        layout["cost"] = cost
    return layout


def _uses_ngd(trainer: Any) -> bool:
    # NGD-type optimizers report their damping in ``stats`` (read by OptimizerMonitor).
    for opt in getattr(trainer, "optimizers", []) or []:
        if hasattr(opt, "stats") or "ngd" in type(opt).__name__.lower():
            return True
    return False


class CurvatureDashboard(Callback):
    """Write the custom-scalars layout (:func:`dashboard_layout`) once per run, on rank zero.

    Open TensorBoard's *Custom Scalars* tab to see trace ± stderr and λ̂ ± std as margin charts,
    λ_max and λ_min in their own charts, and (with an NGD optimizer) NGD's κ and tr F. Requires a
    ``TensorBoardLogger``; without one a warning says so and nothing is written.
    """

    def __init__(self) -> None:
        super().__init__()
        self._written: set[str] = set()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            rank_zero_warn(
                "CurvatureDashboard: no TensorBoardLogger on the Trainer; the custom-scalars "
                "layout is not written"
            )
            return
        layout = dashboard_layout(trainer.callbacks, ngd=_uses_ngd(trainer))
        for lg in loggers:
            if lg.log_dir in self._written:
                continue
            lg.experiment.add_custom_scalars(layout)
            self._written.add(lg.log_dir)
