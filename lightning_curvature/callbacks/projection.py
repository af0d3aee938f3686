"""``LossProjection``: 2-D loss pictures along Hessian and random directions, side by side."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_curvature import landscape
from lightning_curvature.checks import check_choice, check_float, check_int
from lightning_curvature.landscape import LossSurface
from lightning_curvature.landscape.figures import plot_surfaces, render_rgb, split_panels

from .base import CurvatureCallback, Measurement, MeasurementContext
from .measurement_set import derive_seed
from .progress import CountingOperator
from .warm_start import SharedLanczosReader

__all__ = ["LossProjection", "curvature_extent"]

_NORMALIZATIONS = ("filter", "layer", None)


def curvature_extent(curvature: float, rise: float, cap: float) -> float:
    r"""Half-width ``a`` of an axis along which the quadratic model changes the loss by ``rise``.

    ``½·|κ|·a² = rise`` gives ``a = √(2·rise/|κ|)`` (Böttcher & Wheeler 2024 choose extents from
    the curvature in the same way); a flat direction (``κ ≈ 0``) gets ``cap``.
    """
    if not math.isfinite(curvature) or abs(curvature) * cap**2 <= 2.0 * rise:
        return cap
    return math.sqrt(2.0 * rise / abs(curvature))


class LossProjection(SharedLanczosReader, CurvatureCallback):
    """Loss maps along ``(v_max, v_min)`` and along two random directions, plus statistics.

    Random 2-D projections hide saddles: in expectation a random direction sees curvature
    ``tr H / d`` (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"; Böttcher &
    Wheeler 2024, "Visualizing high-dimensional loss landscapes with Hessian directions"). Logged:

    - ``landscape/hessian``, ``landscape/random``: one panel each (axes in parameter-space
      distance, contours, own colour bar); ``landscape/surfaces``: both side by side. The three
      are one drawing (the two-panel figure, fixed layout) and its two halves, so a measurement
      renders one figure, not three;
    - ``landscape/random_saddle_fraction``: share of ``num_random_projections`` random planes
      whose projected 2x2 Hessian is indefinite;
    - ``landscape/projection_trace`` (and ``_stderr``): tr H from quadratic fits of the loss
      along ``num_trace_directions`` random unit directions (forward passes only), with
      ``landscape/projection_trace_radius``: the estimate depends on that radius (on a ReLU MLP
      it read about twice the Hessian trace at 0.05), unlike ``curvature/trace``;
    - ``.npz`` snapshots of both surfaces in ``<log_dir>/landscape/`` for re-plotting.

    The Hessian directions are the epoch's shared Lanczos Ritz vectors (:mod:`.shared`): the
    eigenvalues in the figure's title are ``curvature/lambda_max``/``lambda_min`` of the same
    epoch. The random directions (filter-normalized Gaussians, then unit length) are drawn once
    and kept in ``state_dict`` so snapshots are comparable across epochs.

    *Extents from curvature.* Each axis spans ``±a`` with ``½·|κ|·a² = loss_rise·L(w*)``, ``κ``
    the curvature along that axis (``λ_max``, ``λ_min``, or ``dᵀHd`` for a random unit
    direction, two extra HVPs), capped at ``max_extent_ratio`` times the steepest axis. So every
    axis shows the same predicted loss change and the saddle that ``λ_min < 0`` promises is
    visible instead of being flattened by the steep ``v_max`` edge.

    Parameters
    ----------
    steps : int
        Grid points per axis (odd puts w* on the grid). Cost: ``2·steps²`` forward passes over
        the measurement set. Default 9.
    loss_rise : float
        Predicted loss change at the rim of each axis, relative to ``L(w*)``. Default 1.0.
    max_extent_ratio : float
        Cap of an axis' extent relative to the steepest axis of the same picture. Default 10.
    num_random_projections : int
        Random planes for the saddle fraction (>= 2); 2 HVPs each. Default 8.
    num_trace_directions : int
        Directions of the HVP-free trace; ``trace_num_points - 1`` forward passes each.
        Default 8.
    trace_radius : float
        Largest step of the HVP-free fits (parameter-space distance). Default 0.05.
    trace_num_points : int
        Odd number of step sizes per direction. Default 5.
    max_iters, tol : int, float
        Lanczos budget this callback asks of the shared run. Defaults 15, 1e-3.
    normalization : {"filter", "layer", None}
        Normalization of the random directions before they are scaled to unit length.
    color_scale : {"per_panel", "log"}
        Own linear colour scale per panel (default), or one logarithmic scale for both.
    every_n_epochs : int
        Default 10 (a multiple of the eigenvalue cadence, so the directions are free).
    num_samples, batch_size, seed, loss_fn, eval_mode, measure_on_train_start, name
        See :class:`~lightning_curvature.callbacks.base.CurvatureCallback`.
    """

    def __init__(
        self,
        *,
        steps: int = 9,
        loss_rise: float = 1.0,
        max_extent_ratio: float = 10.0,
        num_random_projections: int = 8,
        num_trace_directions: int = 8,
        trace_radius: float = 0.05,
        trace_num_points: int = 5,
        max_iters: int = 15,
        tol: float = 1e-3,
        normalization: str | None = "filter",
        color_scale: str = "per_panel",
        num_samples: int | None = 256,
        every_n_epochs: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, every_n_epochs=every_n_epochs, **kwargs)
        self.steps: int = check_int("steps", steps, minimum=3)  # type: ignore[assignment]
        self.loss_rise: float = check_float("loss_rise", loss_rise, low=0.0, low_open=True)  # type: ignore[assignment]
        self.max_extent_ratio: float = check_float(  # type: ignore[assignment]
            "max_extent_ratio", max_extent_ratio, low=1.0
        )
        self.num_random_projections: int = check_int(  # type: ignore[assignment]
            "num_random_projections", num_random_projections, minimum=2
        )
        self.num_trace_directions: int = check_int(  # type: ignore[assignment]
            "num_trace_directions", num_trace_directions, minimum=2
        )
        self.trace_radius: float = check_float(  # type: ignore[assignment]
            "trace_radius", trace_radius, low=0.0, low_open=True
        )
        self.trace_num_points: int = check_int("trace_num_points", trace_num_points, minimum=3)  # type: ignore[assignment]
        if self.trace_num_points % 2 == 0:
            raise ValueError(f"`trace_num_points` must be odd and >= 3, got {trace_num_points}")
        self.max_iters: int = check_int("max_iters", max_iters, minimum=2)  # type: ignore[assignment]
        self.tol: float = check_float("tol", tol, low=0.0, high=1.0, low_open=True)  # type: ignore[assignment]
        self.normalization = check_choice("normalization", normalization, _NORMALIZATIONS)
        self.color_scale = check_choice("color_scale", color_scale, ("per_panel", "log"))
        self._random_dirs: list[Tensor] | None = None
        self._init_lanczos_reader()

    @override
    def memory_bytes(self, dim: int, num_samples: int) -> int:
        return 8 * dim * (self.max_iters + 2 * self.num_random_projections + 8)

    @override
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "random_directions": self._random_dirs}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self._random_dirs = state.get("random_directions")

    def _random_directions(self, ctx: MeasurementContext, dim: int) -> list[Tensor]:
        if self._random_dirs is None or any(d.numel() != dim for d in self._random_dirs):
            g = torch.Generator(device=ctx.generator.device)
            g.manual_seed(derive_seed(self.seed, 0xD1EC))
            dirs = landscape.random_directions(
                ctx.pl_module, 2, normalization=self.normalization, generator=g
            )
            self._random_dirs = [(d / d.norm()).detach().cpu() for d in dirs]
        return list(self._random_dirs)

    def _extents(
        self, curvatures: tuple[float, float], ctx: MeasurementContext
    ) -> tuple[float, float]:
        rise = self.loss_rise * max(abs(ctx.center_loss), 1e-12)
        steepest = max(abs(c) for c in curvatures)
        base = math.sqrt(2.0 * rise / steepest) if steepest > 0 else 1.0
        cap = self.max_extent_ratio * base
        return curvature_extent(curvatures[0], rise, cap), curvature_extent(
            curvatures[1], rise, cap
        )

    @override
    def measure(self, ctx: MeasurementContext) -> Measurement:
        op = ctx.shared.hessian()
        device, dtype = op.device, op.dtype
        rand = [d.to(device=device, dtype=dtype) for d in self._random_directions(ctx, op.dim)]
        hvps = self.max_iters + 2 + 2 * self.num_random_projections + 2
        with ctx.progress("Hessian directions + projections", hvps) as bar:
            pairs = ctx.shared.krylov(lambda o: CountingOperator(o, bar)).eigenpairs
            counted = CountingOperator(op, bar)
            proj = landscape.projection_curvatures(
                counted, self.num_random_projections, generator=ctx.generator
            )
            images = counted.matmat(torch.stack(rand, dim=1)).to(torch.float64)
        rand_curv = tuple(float(rand[k].to(torch.float64) @ images[:, k]) for k in range(2))
        hess_dirs = [pairs.v_max, pairs.v_min]
        hess_curv = (pairs.lambda_max, pairs.lambda_min)
        common = {"eval_mode": ctx.eval_mode, "reduce_fn": ctx.reduce_fn, "steps": self.steps}
        with ctx.progress("loss surfaces", 2) as bar:
            hess_surface = landscape.loss_surface(
                ctx.pl_module,
                ctx.loss_fn,
                ctx.data,
                hess_dirs,
                extent=self._extents(hess_curv, ctx),
                labels=("v_max", "v_min"),
                eigenvalues=hess_curv,
                **common,
            )
            bar.update(1)
            rand_surface = landscape.loss_surface(
                ctx.pl_module,
                ctx.loss_fn,
                ctx.data,
                rand,
                extent=self._extents(rand_curv, ctx),  # type: ignore[arg-type]
                labels=("random 1", "random 2"),
                **common,
            )
            bar.update(1)
        trace = landscape.projection_trace_hvp_free(
            ctx.pl_module,
            ctx.loss_fn,
            ctx.data,
            self.num_trace_directions,
            radius=self.trace_radius,
            num_points=self.trace_num_points,
            generator=ctx.generator,
            eval_mode=ctx.eval_mode,
            reduce_fn=ctx.reduce_fn,
        )
        out = Measurement(
            scalars={
                "landscape/random_saddle_fraction": proj.saddle_fraction,
                "landscape/projection_trace": trace.value,
                "landscape/projection_trace_stderr": trace.stderr,
                "landscape/projection_trace_radius": trace.radius,
                "bands/landscape/projection_trace_lower": trace.value - trace.stderr,
                "bands/landscape/projection_trace_upper": trace.value + trace.stderr,
            }
        )
        self._save_snapshots(ctx, hess_surface, rand_surface)
        self._add_figures(out, ctx.step, hess_surface, rand_surface)
        return out

    def _save_snapshots(
        self, ctx: MeasurementContext, hess: LossSurface, rand: LossSurface
    ) -> None:
        folder = ctx.artifact_dir("landscape" if self.label is None else f"landscape_{self.label}")
        if folder is not None:
            hess.save_npz(os.path.join(folder, f"hessian_epoch{ctx.step:04d}.npz"))
            rand.save_npz(os.path.join(folder, f"random_epoch{ctx.step:04d}.npz"))

    def _add_figures(
        self, out: Measurement, step: int, hess: LossSurface, rand: LossSurface
    ) -> None:
        if not (np.isfinite(hess.losses).all() and np.isfinite(rand.losses).all()):
            self._warn(
                f"non-finite losses on the projection grid at epoch {step} (loss_rise too "
                "large?); the pictures are skipped for this epoch"
            )
            return
        scale = self.color_scale
        titles = (
            f"Hessian directions, epoch {step}\n"
            f"λmax={hess.eigenvalues[0]:.3g}, λmin={hess.eigenvalues[1]:.3g}",
            f"random directions, epoch {step}",
        )
        rendered: list[np.ndarray] = []

        def image() -> np.ndarray:
            # One drawing serves the three tags: the two-panel figure (fixed layout, each panel
            # with its title and colour bar in its own half) and its halves as the single panels.
            if not rendered:
                fig = plot_surfaces(hess, rand, titles=titles, color_scale=scale)
                rendered.append(render_rgb(fig))
                _close_figure(fig)
            return rendered[0]

        out.images["landscape/surfaces"] = image
        out.images["landscape/hessian"] = lambda: split_panels(image(), 2)[0]
        out.images["landscape/random"] = lambda: split_panels(image(), 2)[1]


def _close_figure(fig: Any) -> None:
    # Built without pyplot; clearing drops the artists now instead of at the next GC pass.
    fig.clear()
