"""``LossProjection``: 2-D loss pictures along Hessian and random directions, side by side."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from lightning_curvature import curvature, landscape

from .base import CurvatureCallback, Measurement, MeasurementContext, check_float, check_int
from .measurement_set import derive_seed
from .progress import CountingOperator

__all__ = ["LossProjection"]


class LossProjection(CurvatureCallback):
    """Loss heat maps along ``(v_max, v_min)`` and along two random directions, plus statistics.

    Random 2-D projections hide saddles: in expectation a random direction sees curvature
    ``tr H`` (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"; Böttcher & Wheeler
    2024, "Visualizing high-dimensional loss landscapes with Hessian directions"). Logged:

    - ``landscape/hessian``, ``landscape/random``: heat-map images on one shared color scale;
      ``landscape/surfaces``: both panels with contours (``plot_surfaces``);
    - ``landscape/random_saddle_fraction``: share of ``num_random_projections`` random planes
      whose projected 2x2 Hessian is indefinite;
    - ``landscape/projection_trace`` (and ``_stderr``): tr H from quadratic fits of the loss
      along ``num_trace_directions`` random unit directions (forward passes only);
    - ``.npz`` snapshots of both surfaces in ``<log_dir>/landscape/`` for re-plotting.

    The random directions (filter-normalized Gaussians) are drawn once, at the first
    measurement, and kept in ``state_dict`` so snapshots are comparable across epochs. The
    Hessian directions are recomputed every time (Lanczos warm-started from the last ones) and
    scaled to the lengths of the random directions, so both pictures span the same
    parameter-space distance.

    Parameters
    ----------
    steps : int
        Grid points per axis (odd puts w* on the grid). Cost: ``2·steps²`` forward passes over
        the measurement set. Default 9.
    extent : float
        Half-width of the grid in units of the direction length. Default 1.0.
    num_random_projections : int
        Random planes for the saddle fraction; 2 HVPs each. Default 8.
    num_trace_directions : int
        Directions of the HVP-free trace; ``trace_num_points - 1`` forward passes each.
        Default 8.
    trace_radius : float
        Largest step of the HVP-free fits (parameter-space distance). Default 0.05.
    trace_num_points : int
        Odd number of step sizes per direction. Default 5.
    max_iters, tol : int, float
        Lanczos budget of the Hessian directions (one HVP per iteration). Defaults 15, 1e-3.
    normalization : {"filter", "layer", None}
        Normalization of the random directions. Default "filter".
    every_n_epochs : int
        Default 10: one measurement costs about half an epoch (2·81 grid losses, 31 HVPs,
        33 losses for the trace fits), about 5% amortized. Pictures are for looking at
        snapshots; ``measure_on_train_start=True`` adds one at epoch 0.
    num_samples, batch_size, seed, loss_fn, eval_mode, measure_on_train_start
        See :class:`~lightning_curvature.callbacks.base.CurvatureCallback`.

    Notes
    -----
    ``landscape/projection_trace`` depends on ``trace_radius`` (see
    :func:`lightning_curvature.landscape.projection_trace_hvp_free`): on a ReLU MLP it read
    about twice the Hutch++ trace at the default radius.
    Measured costs are for an MLP 784-256-256-10 on one CPU thread, relative to one
    Fashion-MNIST training epoch at batch 128 (``benchmarks/overhead.py``,
    ``docs/benchmarks.md``).
    """

    def __init__(
        self,
        *,
        steps: int = 9,
        extent: float = 1.0,
        num_random_projections: int = 8,
        num_trace_directions: int = 8,
        trace_radius: float = 0.05,
        trace_num_points: int = 5,
        max_iters: int = 15,
        tol: float = 1e-3,
        normalization: str | None = "filter",
        num_samples: int | None = 256,
        every_n_epochs: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=num_samples, every_n_epochs=every_n_epochs, **kwargs)
        self.steps = check_int("steps", steps, 3)
        self.extent = check_float("extent", extent, low=0.0, low_open=True)
        self.num_random_projections = check_int("num_random_projections", num_random_projections, 1)
        self.num_trace_directions = check_int("num_trace_directions", num_trace_directions, 2)
        self.trace_radius = check_float("trace_radius", trace_radius, low=0.0, low_open=True)
        self.trace_num_points = check_int("trace_num_points", trace_num_points, 3)
        if self.trace_num_points % 2 == 0:
            raise ValueError(f"trace_num_points must be odd and >= 3, got {trace_num_points}")
        self.max_iters = check_int("max_iters", max_iters, 2)
        self.tol = check_float("tol", tol, low=0.0, high=1.0, low_open=True)
        if normalization not in ("filter", "layer", None):
            raise ValueError(
                f"normalization must be 'filter', 'layer' or None, got {normalization!r}"
            )
        self.normalization = normalization
        self._random_dirs: list[torch.Tensor] | None = None
        self._warm_start: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_state(self) -> dict[str, Any]:
        return {"random_directions": self._random_dirs, "warm_start": self._warm_start}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._random_dirs = state.get("random_directions")
        self._warm_start = state.get("warm_start")

    def _random_directions(self, ctx: MeasurementContext, dim: int) -> list[torch.Tensor]:
        if self._random_dirs is None or any(d.numel() != dim for d in self._random_dirs):
            g = torch.Generator(device=ctx.generator.device)
            g.manual_seed(derive_seed(self.seed, 0xD1EC))
            dirs = landscape.random_directions(
                ctx.pl_module, 2, normalization=self.normalization, generator=g
            )
            self._random_dirs = [d.detach().cpu() for d in dirs]
        return list(self._random_dirs)

    def measure(self, ctx: MeasurementContext) -> Measurement:
        op = curvature.HessianOperator(
            ctx.pl_module, ctx.loss_fn, ctx.data, eval_mode=ctx.eval_mode, reduce_fn=ctx.reduce_fn
        )
        device, dtype = op.device, op.dtype
        rand = [d.to(device=device, dtype=dtype) for d in self._random_directions(ctx, op.dim)]
        v0 = None
        if self._warm_start is not None and all(v.numel() == op.dim for v in self._warm_start):
            v0 = [v.to(device=device, dtype=dtype) for v in self._warm_start]
        hvps = self.max_iters + 2 * self.num_random_projections
        common = {"eval_mode": ctx.eval_mode, "reduce_fn": ctx.reduce_fn}
        with ctx.progress("Hessian directions + projections", hvps) as bar:
            counted = CountingOperator(op, bar)
            hd = landscape.hessian_directions(
                counted, v0=v0, generator=ctx.generator, max_iters=self.max_iters, tol=self.tol
            )
            proj = landscape.projection_curvatures(
                counted, self.num_random_projections, generator=ctx.generator
            )
        if torch.isfinite(hd.v_max).all() and torch.isfinite(hd.v_min).all():
            self._warm_start = (hd.v_max.detach().cpu(), hd.v_min.detach().cpu())
        # Same parameter-space length as the random directions: both pictures span equal distances.
        scaled = [hd.v_max * rand[0].norm(), hd.v_min * rand[1].norm()]
        with ctx.progress("loss surfaces", 2) as bar:
            hess_surface = landscape.loss_surface(
                ctx.pl_module,
                ctx.loss_fn,
                ctx.data,
                scaled,
                extent=self.extent,
                steps=self.steps,
                labels=("v_max", "v_min"),
                eigenvalues=(float(hd.lambda_max), float(hd.lambda_min)),
                **common,
            )
            bar.update(1)
            rand_surface = landscape.loss_surface(
                ctx.pl_module,
                ctx.loss_fn,
                ctx.data,
                rand,
                extent=self.extent,
                steps=self.steps,
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
            **common,
        )
        out = Measurement(
            scalars={
                "landscape/random_saddle_fraction": float(proj.saddle_fraction),
                "landscape/projection_trace": float(trace.value),
                "landscape/projection_trace_stderr": float(trace.stderr),
            }
        )
        folder = ctx.artifact_dir("landscape")
        if folder is not None:
            hess_surface.save_npz(os.path.join(folder, f"hessian_epoch{ctx.step:04d}.npz"))
            rand_surface.save_npz(os.path.join(folder, f"random_epoch{ctx.step:04d}.npz"))
        if _finite(hess_surface) and _finite(rand_surface):
            both = np.concatenate([hess_surface.losses.ravel(), rand_surface.losses.ravel()])
            lo, hi = float(both.min()), float(both.max())
            out.images["landscape/hessian"] = lambda: _heatmap(hess_surface.losses, lo, hi)
            out.images["landscape/random"] = lambda: _heatmap(rand_surface.losses, lo, hi)
            out.figures["landscape/surfaces"] = lambda: landscape.plot_surfaces(
                hess_surface, rand_surface, suptitle=f"epoch {ctx.step}"
            )
        else:
            self._warn(
                f"non-finite losses on the projection grid at epoch {ctx.step} (extent too "
                "large?); the heat maps are skipped for this epoch"
            )
        return out


def _finite(surface: Any) -> bool:
    return bool(np.all(np.isfinite(surface.losses)))


def _heatmap(losses: np.ndarray, lo: float, hi: float, scale: int = 12) -> np.ndarray:
    """An RGB uint8 image of ``losses`` (first axis = x, second = y, y pointing up)."""
    from matplotlib import colormaps

    span = hi - lo if hi > lo else 1.0
    z = (np.asarray(losses, dtype=np.float64).T[::-1] - lo) / span
    rgb = colormaps["viridis"](np.clip(z, 0.0, 1.0))[..., :3]
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    return (rgb * 255).round().astype(np.uint8)
