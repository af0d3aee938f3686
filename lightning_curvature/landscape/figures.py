"""Matplotlib figures for loss surfaces: heat maps side by side, 1-D slices, GIF animations.

Everything uses the object-oriented API on ``matplotlib.figure.Figure`` (no ``pyplot``, so no
global figure registry and no GUI backend): safe in callbacks, on headless machines and in
threads. Save with ``fig.savefig(path)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .surface import LossSurface

__all__ = [
    "COLOR_SCALES",
    "plot_slices",
    "plot_surface",
    "plot_surfaces",
    "render_rgb",
    "save_animation",
    "split_panels",
]


#: Colour scales: one linear scale per panel, one linear scale shared by all panels, one log scale.
COLOR_SCALES = ("per_panel", "shared", "log")


def _default_title(surface: LossSurface) -> str:
    if surface.eigenvalues is not None and len(surface.eigenvalues) == 2:
        lmax, lmin = surface.eigenvalues
        return f"Hessian directions\nλmax={lmax:.3g}, λmin={lmin:.3g}"
    return "Random directions"


def _norm(surfaces: Sequence[LossSurface], log_scale: bool) -> Normalize:
    finite = np.concatenate([s.losses[np.isfinite(s.losses)].ravel() for s in surfaces])
    if finite.size == 0:
        raise ValueError("surfaces: no finite loss values to plot")
    vmin, vmax = float(finite.min()), float(finite.max())
    if vmax == vmin:
        vmax = vmin + 1e-12 + abs(vmin) * 1e-9
    if log_scale:
        if vmin <= 0:
            raise ValueError("a log colour scale needs positive losses")
        return LogNorm(vmin=vmin, vmax=vmax)
    return Normalize(vmin=vmin, vmax=vmax)


def _axis_label(surface: LossSurface, k: int) -> str:
    # Unit directions: the coordinate is a distance in parameter space; otherwise a multiple of d.
    norm = surface.direction_norms[k]
    symbol = ("α", "β")[k]
    if abs(norm - 1.0) < 1e-3:  # unit up to float32 rounding
        return f"{symbol}: distance along {surface.labels[k]}"
    return f"{symbol} (multiples of {surface.labels[k]}, ‖d‖={norm:.3g})"


def _contour_levels(norm: Normalize, levels: int) -> np.ndarray:
    """Contour values: geometric on a log scale, else quadratic in the rise above the minimum.

    ``vmin + (vmax − vmin)·(k/n)²`` puts the rings of a quadratic bowl at equal distances, so
    the flat region around ``w*`` (where a saddle shows) gets as many lines as the steep rim.
    """
    if isinstance(norm, LogNorm):
        return np.geomspace(norm.vmin, norm.vmax, levels)
    fractions = np.linspace(0.0, 1.0, levels) ** 2
    return norm.vmin + (norm.vmax - norm.vmin) * fractions[1:]


def _draw_surface(ax, surface: LossSurface, norm: Normalize, title: str, levels: int, cmap: str):  # type: ignore[no-untyped-def]
    x, y = surface.coords
    z = surface.losses.T  # rows follow the second direction (y axis)
    mesh = ax.pcolormesh(x, y, z, norm=norm, cmap=cmap, shading="gouraud")
    if np.isfinite(z).all() and np.ptp(z) > 0:
        contour_levels = _contour_levels(norm, levels)
        ax.contour(x, y, z, levels=contour_levels, colors="white", linewidths=0.7, alpha=0.85)
    (xm, ym), _ = surface.grid_minimum()
    ax.plot([0.0], [0.0], marker="+", color="black", markersize=12, mew=2, linestyle="none",
            label="w*")  # fmt: skip
    ax.plot(
        [xm], [ym], marker="*", color="red", markersize=12, linestyle="none", label="grid minimum"
    )
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.ticklabel_format(style="sci", scilimits=(-3, 4), useMathText=False)
    ax.set_xlabel(_axis_label(surface, 0))
    ax.set_ylabel(_axis_label(surface, 1))
    ax.set_title(title)
    ax.set_aspect("auto")
    return mesh


#: Fixed layout of one panel inside its slot of the figure (fractions of the slot's width and
#: of the figure's height): heat map, then its colour bar. A fixed layout instead of matplotlib's
#: constrained layout: the layout pass measured about half the rendering time of these figures
#: (they are drawn at every LossProjection measurement). Each panel and its colour bar stay
#: inside their own slot, so a two-panel figure cut at its middle gives the two single panels.
_AXES_RECT = (0.15, 0.13, 0.60, 0.71)
_CBAR_RECT = (0.79, 0.13, 0.03, 0.71)


def _slot_rect(rect: tuple[float, float, float, float], k: int, n: int) -> list[float]:
    left, bottom, width, height = rect
    return [(k + left) / n, bottom, width / n, height]


def _draw_panels(
    fig: Figure,
    surfaces: Sequence[LossSurface],
    titles: Sequence[str] | None,
    color_scale: str,
    levels: int,
    cmap: str,
    suptitle: str | None,
    norm: Normalize | None = None,
) -> Figure:
    n = len(surfaces)
    top = 0.84 if not suptitle else 0.78
    axes_rect = (_AXES_RECT[0], _AXES_RECT[1], _AXES_RECT[2], top - _AXES_RECT[1])
    cbar_rect = (_CBAR_RECT[0], _CBAR_RECT[1], _CBAR_RECT[2], top - _CBAR_RECT[1])
    axes = [fig.add_axes(_slot_rect(axes_rect, k, n)) for k in range(n)]
    shared = norm
    if shared is None and color_scale != "per_panel":
        shared = _norm(surfaces, color_scale == "log")
    meshes = []
    for k, (ax, surface) in enumerate(zip(axes, surfaces, strict=True)):
        title = titles[k] if titles is not None else _default_title(surface)
        panel_norm = shared if shared is not None else _norm([surface], False)
        meshes.append(_draw_surface(ax, surface, panel_norm, title, levels, cmap))
    axes[0].legend(loc="lower left", fontsize=8, framealpha=0.7)
    if shared is None:
        for k, mesh in enumerate(meshes):
            fig.colorbar(mesh, cax=fig.add_axes(_slot_rect(cbar_rect, k, n)), label="loss")
    else:
        fig.colorbar(meshes[-1], cax=fig.add_axes(_slot_rect(cbar_rect, n - 1, n)), label="loss")
    if suptitle:
        fig.suptitle(suptitle, y=0.98)
    return fig


def render_rgb(fig: Figure) -> np.ndarray:
    """The figure drawn by the Agg backend, as an ``(H, W, 3)`` ``uint8`` array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def split_panels(image: np.ndarray, n: int) -> list[np.ndarray]:
    """Cut a rendered ``n``-panel figure of :func:`plot_surfaces` into its ``n`` panels.

    Exact because every panel, its labels and its colour bar lie inside their own ``1/n`` of the
    figure's width (fixed layout, no suptitle across the panels).
    """
    width = image.shape[1]
    edges = [round(k * width / n) for k in range(n + 1)]
    return [image[:, a:b].copy() for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _check_2d(surfaces: Sequence[LossSurface]) -> None:
    for s in surfaces:
        if not isinstance(s, LossSurface) or s.ndim != 2:
            raise ValueError("surfaces must be 2-D LossSurface objects (two directions)")


def _scale_of(color_scale: str | None, log_scale: bool) -> str:
    if color_scale is None:
        return "log" if log_scale else "per_panel"
    if color_scale not in COLOR_SCALES:
        raise ValueError(f"`color_scale` must be one of {COLOR_SCALES}, got {color_scale!r}")
    return color_scale


#: Font sizes that stay readable when TensorBoard's Images tab shows a figure at ~500 px wide.
_RC = {"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 10, "figure.titlesize": 12}


def plot_surface(
    surface: LossSurface,
    *,
    title: str | None = None,
    color_scale: str = "per_panel",
    levels: int = 12,
    cmap: str = "viridis",
    figsize: tuple[float, float] = (5.4, 4.4),
) -> Figure:
    """One loss surface: heat map, contours, axes in direction units, its own colour bar.

    Parameters
    ----------
    surface : LossSurface
        A 2-D surface.
    title : str, optional
        Default: names the eigenvalues for Hessian directions, else "Random directions".
    color_scale : {"per_panel", "shared", "log"}
        Linear (default) or logarithmic colour scale.
    levels, cmap, figsize :
        Appearance.
    """
    _check_2d([surface])
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=figsize, dpi=100)
        scale = "log" if _scale_of(color_scale, False) == "log" else "per_panel"
        return _draw_panels(fig, [surface], [title] if title else None, scale, levels, cmap, None)


def plot_surfaces(
    hessian_surface: LossSurface,
    random_surface: LossSurface | None = None,
    *,
    titles: Sequence[str] | None = None,
    suptitle: str | None = None,
    levels: int = 12,
    cmap: str = "viridis",
    log_scale: bool = False,
    color_scale: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Heat maps of the Hessian-direction and random-direction surfaces side by side.

    Each panel shows the loss (colour, with contour lines), the point :math:`w^*` (+) and the
    grid minimum (red star), with axes in the directions' units (parameter-space distance for
    unit directions). The default title of a surface with eigenvalues names
    :math:`\\lambda_{max}` and :math:`\\lambda_{min}`.

    Colour scales (``color_scale``): ``"per_panel"`` (default) gives each panel its own linear
    scale and colour bar, so a plane whose losses span 0.8–2.9 stays readable next to one that
    spans 0.8–1,900 (the seed figures draw each projection on its own scale, and the saddle of
    the Hessian plane shows as contours that cross at ``w*``); ``"shared"`` uses one linear
    scale (same colour = same loss), ``"log"`` one logarithmic scale that keeps both readable
    when their ranges differ by orders of magnitude.

    Parameters
    ----------
    hessian_surface : LossSurface
        2-D surface (usually along ``v_max``, ``v_min``).
    random_surface : LossSurface, optional
        2-D surface along random directions; omitted: a single panel.
    titles : sequence of str, optional
        One per panel.
    suptitle : str, optional
        Figure title.
    levels : int
        Number of contour levels.
    cmap : str
        Matplotlib colormap.
    log_scale : bool
        Shorthand for ``color_scale="log"`` (kept for existing callers).
    color_scale : {"per_panel", "shared", "log"}, optional
        See above.
    figsize : (float, float), optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    surfaces = [hessian_surface] + ([random_surface] if random_surface is not None else [])
    _check_2d(surfaces)
    if titles is not None and len(titles) != len(surfaces):
        raise ValueError(f"titles: need {len(surfaces)} titles, got {len(titles)}")
    scale = _scale_of(color_scale, log_scale)
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=figsize or (5.6 * len(surfaces), 4.6), dpi=100)
        return _draw_panels(fig, surfaces, titles, scale, levels, cmap, suptitle)


def _slices_of(
    surface: LossSurface,
) -> list[tuple[np.ndarray, np.ndarray, str, float | None, float]]:
    """(coords, losses, label, eigenvalue, direction norm) for each axis through the centre."""
    eig = surface.eigenvalues
    if surface.ndim == 1:
        return [
            (
                surface.coords[0],
                surface.losses,
                surface.labels[0],
                eig[0] if eig else None,
                surface.direction_norms[0],
            )
        ]
    steps = surface.losses.shape
    if steps[0] % 2 == 0 or steps[1] % 2 == 0:
        raise ValueError("a 2-D surface needs an odd number of steps to slice through its centre")
    rows = surface.losses[:, steps[1] // 2]
    cols = surface.losses[steps[0] // 2, :]
    return [
        (
            surface.coords[0],
            rows,
            surface.labels[0],
            eig[0] if eig else None,
            surface.direction_norms[0],
        ),
        (
            surface.coords[1],
            cols,
            surface.labels[1],
            eig[1] if eig else None,
            surface.direction_norms[1],
        ),
    ]


def plot_slices(
    surfaces: LossSurface | Sequence[LossSurface],
    *,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    r"""1-D slices :math:`L(w^* + a\,d) - L(w^*)` with the quadratic prediction overlaid.

    For a direction with a known Hessian eigenvalue :math:`\lambda` (e.g. ``v_max``, ``v_min``
    from :func:`hessian_directions`) the second-order model is
    :math:`\tfrac12 \lambda \lVert d\rVert^2 a^2` (``‖d‖ = 1`` for eigenvectors), drawn dashed.
    Near a critical point the measured slice should follow it for small ``a``.

    Parameters
    ----------
    surfaces : LossSurface or sequence of LossSurface
        1-D surfaces (one panel each), or a 2-D surface with an odd number of steps (its two
        axes through the centre).
    figsize : (float, float), optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    items = [surfaces] if isinstance(surfaces, LossSurface) else list(surfaces)
    if not items or not all(isinstance(s, LossSurface) for s in items):
        raise ValueError("surfaces: give a LossSurface or a non-empty sequence of them")
    slices = [(s, sl) for s in items for sl in _slices_of(s)]
    fig = Figure(figsize=figsize or (4.2 * len(slices), 3.6), layout="constrained")
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    for ax, (surface, (a, values, label, eig, norm)) in zip(axes, slices, strict=True):
        ax.plot(a, values - surface.center_loss, "o-", markersize=3, label="measured")
        if eig is not None:
            fine = np.linspace(a.min(), a.max(), 200)
            ax.plot(
                fine,
                0.5 * eig * norm**2 * fine**2,
                "--",
                color="C3",
                label=f"$\\frac{{1}}{{2}}\\lambda a^2$, $\\lambda$={eig:.3g}",
            )
        ax.axhline(0.0, color="gray", linewidth=0.5)
        ax.set_xlabel(f"$a$ along {label}")
        ax.set_ylabel("$L(w^* + a\\,d) - L(w^*)$")
        ax.legend(fontsize=8)
    return fig


def save_animation(
    snapshots: Sequence[LossSurface | tuple[LossSurface, LossSurface]],
    path: str | os.PathLike,
    *,
    fps: float = 2.0,
    titles: Sequence[str] | None = None,
    levels: int = 15,
    cmap: str = "viridis",
    log_scale: bool = False,
    dpi: int = 80,
    figsize: tuple[float, float] | None = None,
) -> Path:
    """Write a GIF with one frame per snapshot (e.g. per epoch), one color scale for all frames.

    Parameters
    ----------
    snapshots : sequence of LossSurface or of (hessian, random) pairs
        2-D surfaces in frame order.
    path : path-like
        Output file (``.gif``), written with matplotlib's ``PillowWriter``.
    fps : float
        Frames per second, ``> 0``.
    titles : sequence of str, optional
        One figure title per frame (e.g. ``"epoch 3"``).
    levels, cmap, log_scale, dpi, figsize :
        Appearance, as :func:`plot_surfaces`.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from matplotlib.animation import PillowWriter

    frames = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in snapshots]
    if not frames:
        raise ValueError("snapshots: need at least one snapshot")
    if len({len(f) for f in frames}) != 1:
        raise ValueError("snapshots: every frame needs the same number of panels")
    if not (fps > 0):
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if titles is not None and len(titles) != len(frames):
        raise ValueError(f"titles: need {len(frames)} titles, got {len(titles)}")
    for f in frames:
        _check_2d(f)
    norm = _norm([s for f in frames for s in f], log_scale)
    n_panels = len(frames[0])
    fig = Figure(figsize=figsize or (5.2 * n_panels + 1.0, 4.4))
    path = Path(path)
    writer = PillowWriter(fps=fps)
    scale = "log" if log_scale else "shared"
    with writer.saving(fig, str(path), dpi):
        for k, f in enumerate(frames):
            fig.clear()
            title = titles[k] if titles else None
            _draw_panels(fig, f, None, scale, levels, cmap, title, norm=norm)
            writer.grab_frame()
    return path
