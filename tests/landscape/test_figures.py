import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure

from lightning_curvature.landscape import LossSurface, plot_slices, plot_surfaces, save_animation
from lightning_curvature.landscape.figures import plot_surface


def _surface(shift=0.0, eig=None, steps=5):
    a = np.linspace(-1, 1, steps)
    A, B = np.meshgrid(a, a, indexing="ij")
    losses = 1.0 + shift + 0.5 * (2.0 * A**2 - 0.5 * B**2) if eig else 1.0 + A**2 + B**2 + shift
    return LossSurface(
        coords=(a, a.copy()),
        losses=losses,
        center_loss=1.0 + shift,
        direction_norms=(1.0, 1.0),
        labels=("v_max", "v_min") if eig else ("d1", "d2"),
        eigenvalues=eig,
    )


def test_plot_surfaces_shares_one_color_scale_and_marks_minimum():
    hess = _surface(eig=(2.0, -0.5))
    rand = _surface(shift=3.0)
    fig = plot_surfaces(hess, rand, color_scale="shared")
    assert isinstance(fig, Figure)
    meshes = [c for ax in fig.axes[:2] for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 2
    lo = min(hess.losses.min(), rand.losses.min())
    hi = max(hess.losses.max(), rand.losses.max())
    for m in meshes:
        assert m.norm.vmin == pytest.approx(lo) and m.norm.vmax == pytest.approx(hi)
    titles = [ax.get_title() for ax in fig.axes[:2]]
    assert "2" in titles[0] and "-0.5" in titles[0] and "Random" in titles[1]
    # the red star sits on the grid minimum of the Hessian panel: (0, ±1) here
    star = [ln for ln in fig.axes[0].lines if ln.get_marker() == "*"][0]
    assert star.get_xdata()[0] == 0.0 and abs(star.get_ydata()[0]) == 1.0
    assert len(fig.axes) == 3  # two panels + one shared colorbar


def test_default_gives_each_panel_its_own_scale_colour_bar_and_labelled_axes():
    # ranges that differ by orders of magnitude (the Hessian plane's steep edge vs a flat
    # random plane): each panel must still span its own colours
    hess = _surface(eig=(2.0, -0.5))
    hess.losses = 1.0 + 900.0 * (hess.losses - 1.0)
    rand = _surface(shift=3.0)
    fig = plot_surfaces(hess, rand)
    panels = fig.axes[:2]
    for ax, s in zip(panels, (hess, rand), strict=True):
        (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
        assert mesh.norm.vmin == pytest.approx(s.losses.min())
        assert mesh.norm.vmax == pytest.approx(s.losses.max())
        assert "distance along" in ax.get_xlabel() and "distance along" in ax.get_ylabel()
        assert len(ax.collections) > 1  # contour lines on top of the heat map
    assert len(fig.axes) == 4  # two panels, two colour bars
    log = plot_surfaces(rand, _surface(shift=500.0), color_scale="log")
    norms = {
        type(c.norm).__name__
        for ax in log.axes[:2]
        for c in ax.collections
        if isinstance(c, QuadMesh)
    }
    assert norms == {"LogNorm"}
    with pytest.raises(ValueError, match="color_scale"):
        plot_surfaces(hess, rand, color_scale="rainbow")


def test_plot_surface_draws_one_panel_with_its_colour_bar():
    fig = plot_surface(_surface(eig=(2.0, -0.5)), title="epoch 3")
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "epoch 3"
    width, height = fig.get_size_inches() * fig.dpi
    assert 400 <= width <= 700 and 300 <= height <= 600  # legible in TensorBoard's Images tab


def test_plot_slices_overlays_quadratic_prediction():
    fig = plot_slices(_surface(eig=(2.0, -0.5)))
    assert len(fig.axes) == 2
    for ax, lam in zip(fig.axes, (2.0, -0.5), strict=True):
        measured, predicted = ax.lines[0], ax.lines[1]
        a = predicted.get_xdata()
        np.testing.assert_allclose(predicted.get_ydata(), 0.5 * lam * a**2)
        assert len(measured.get_xdata()) == 5
    with pytest.raises(ValueError, match="odd"):
        plot_slices(_surface(eig=(2.0, -0.5), steps=4))


def test_save_animation_writes_gif(tmp_path):
    from PIL import Image

    frames = [(_surface(eig=(2.0, -0.5), shift=k), _surface(shift=k)) for k in range(3)]
    path = save_animation(frames, tmp_path / "landscape.gif", titles=["e0", "e1", "e2"])
    with Image.open(path) as im:
        assert im.format == "GIF"
        assert im.n_frames == 3
    with pytest.raises(ValueError, match="fps"):
        save_animation(frames, tmp_path / "x.gif", fps=0)


def test_rejects_one_dimensional_surfaces():
    a = np.linspace(-1, 1, 3)
    line = LossSurface((a,), a**2, 0.0, (1.0,), ("d1",))
    with pytest.raises(ValueError, match="2-D"):
        plot_surfaces(line)
    fig = plot_slices([line, line])
    assert len(fig.axes) == 2


def test_two_panel_figure_cuts_into_its_panels_at_the_middle():
    # Nothing (labels, colour bars, titles) crosses the middle of the fixed layout, so the
    # halves are the single panels that LossProjection logs from one drawing.
    from lightning_curvature.landscape.figures import render_rgb, split_panels

    hess = _surface(eig=(2.0, -0.5))
    hess.losses = 1.0 + 900.0 * (hess.losses - 1.0)
    fig = plot_surfaces(hess, _surface(shift=3.0), titles=["Hessian, epoch 4\nλmax=2", "random"])
    image = render_rgb(fig)
    height, width, channels = image.shape
    assert channels == 3 and image.dtype.name == "uint8"
    middle = image[:, width // 2 - 3 : width // 2 + 3]
    assert (middle == 255).all()
    left, right = split_panels(image, 2)
    assert left.shape[1] + right.shape[1] == width and left.shape[0] == right.shape[0] == height
    for half in (left, right):
        assert (half < 128).any()  # each half holds a drawn panel, not blank space
