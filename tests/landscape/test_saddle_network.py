"""A trained network at a point with λ_min < 0: Hessian directions show it, random ones do not.

The 1-16-16-1 tanh net after 500 Adam steps on the function-approximation task sits at a point
where the Hessian has λ_max ≈ 13 and λ_min ≈ −0.01 (checked below with the dense float64
Hessian): the textbook case of negative curvature hidden by a large positive trace.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lightning_curvature.landscape import (
    HessianDirections,
    hessian_directions,
    loss_surface,
    projection_curvatures,
    random_directions,
)


@pytest.fixture(scope="module")
def saddle_point(helpers):
    model, data = helpers.trained_tanh_net(seed=3, steps=500)
    loss_fn = nn.MSELoss()
    _, hess = helpers.flat_hessian(model, loss_fn, data)
    evals, evecs = torch.linalg.eigh(hess)
    assert evals[0] < -1e-3 < 1.0 < evals[-1]  # an indefinite Hessian: a saddle region
    return SimpleNamespace(
        model=model,
        data=data,
        loss_fn=loss_fn,
        hess=hess,
        evals=evals,
        evecs=evecs,
        helpers=helpers,
    )


def _check_surfaces(sp, directions):
    hess_surface = loss_surface(sp.model, sp.loss_fn, sp.data, directions, steps=21, extent=1.0)
    mid = 10
    along_v_min = hess_surface.losses[mid, :] - hess_surface.center_loss
    # the even part (L(b) + L(-b))/2 - L(0) removes the gradient's linear term: what is left
    # going down is negative curvature, not a slope
    even = (along_v_min + along_v_min[::-1]) / 2
    assert even.min() < -1e-3
    (_, b_min), loss_min = hess_surface.grid_minimum()
    assert b_min != 0.0 and loss_min < hess_surface.center_loss
    for seed in range(3):
        dirs = random_directions(sp.model, 2, generator=torch.Generator().manual_seed(seed))
        rand_surface = loss_surface(sp.model, sp.loss_fn, sp.data, dirs, steps=21, extent=1.0)
        assert rand_surface.grid_minimum()[0] == (0.0, 0.0), seed
        assert rand_surface.grid_minimum()[1] == rand_surface.center_loss


def test_hessian_surface_goes_down_along_v_min_random_surface_does_not(saddle_point):
    sp = saddle_point
    directions = HessianDirections(
        sp.evecs[:, -1], sp.evecs[:, 0], sp.evals[-1].item(), sp.evals[0].item(), None
    )
    _check_surfaces(sp, directions)


def test_random_projections_of_this_hessian_rarely_show_the_saddle(saddle_point):
    op = saddle_point.helpers.DenseOperator(saddle_point.hess)
    r = projection_curvatures(op, 500, generator=torch.Generator().manual_seed(0))
    assert r.saddle_fraction < 0.05
    assert abs(r.trace_estimate - torch.trace(saddle_point.hess).item()) < 4 * r.trace_stderr


def test_engine_hessian_directions_find_the_saddle(saddle_point):
    from lightning_curvature import curvature

    sp = saddle_point
    op = curvature.HessianOperator(sp.model, sp.loss_fn, sp.data)
    # tol is relative to max |λ| ≈ 13: resolving λ_min ≈ -0.01 needs tol well below 1e-3
    hd = hessian_directions(
        op, tol=1e-7, max_iters=2000, generator=torch.Generator().manual_seed(0)
    )
    assert hd.converged
    assert hd.lambda_max == pytest.approx(sp.evals[-1].item(), rel=1e-6)
    assert hd.lambda_min == pytest.approx(sp.evals[0].item(), rel=1e-4, abs=1e-6)
    assert abs(hd.v_max @ sp.evecs[:, -1]) == pytest.approx(1.0, abs=1e-6)
    assert abs(hd.v_min @ sp.evecs[:, 0]) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(hd.v_min.norm().item(), 1.0, rtol=1e-10)
    _check_surfaces(sp, hd)


def test_hessian_directions_on_a_diagonal_operator(helpers):
    h = torch.linspace(-1.0, 3.0, 60, dtype=torch.float64)
    h = h[torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    hd = hessian_directions(
        helpers.DiagonalOperator(h), tol=1e-8, generator=torch.Generator().manual_seed(1)
    )
    assert hd.lambda_max == pytest.approx(3.0, rel=1e-8)
    assert hd.lambda_min == pytest.approx(-1.0, rel=1e-8)
    assert abs(hd.v_max[int(torch.argmax(h))]) == pytest.approx(1.0, abs=1e-6)
    assert abs(hd.v_min[int(torch.argmin(h))]) == pytest.approx(1.0, abs=1e-6)
    assert hd.directions[0] is hd.v_max and hd.eigenvalues == (hd.lambda_max, hd.lambda_min)
    assert hd.num_matvecs > 0 and hd.converged
