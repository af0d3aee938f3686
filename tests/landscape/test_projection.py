import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_curvature.landscape import projection_curvatures, projection_trace_hvp_free


def _diag(pos: int, neg: int) -> torch.Tensor:
    return torch.cat([torch.ones(pos), -torch.ones(neg), torch.zeros(1)]).double()


def test_balanced_saddle_shows_in_about_70_percent(helpers):
    # Böttcher & Wheeler §III: L = ½ θ_{2n+1} (Σ θ_i² − θ_{i+n}²) at θ* = (0,…,0,1), n = 500,
    # has H = diag(+1 x 500, −1 x 500, 0); random planes show the saddle in ≈ 70% of draws.
    op = helpers.DiagonalOperator(_diag(500, 500))
    r = projection_curvatures(op, 2000, generator=torch.Generator().manual_seed(0))
    assert 0.65 < r.saddle_fraction < 0.75
    assert r.saddle_fraction_stderr == pytest.approx(
        math.sqrt(r.saddle_fraction * (1 - r.saddle_fraction) / 2000)
    )
    assert abs(r.trace_estimate) < 4 * r.trace_stderr  # tr H = 0
    assert r.num_matvecs == 4000 == op.num_matvecs
    assert r.kappa_plus.shape == r.kappa_minus.shape == (2000,)
    assert r.matrices.shape == (2000, 2, 2)


def test_dominant_positive_curvature_hides_the_saddle(helpers):
    op = helpers.DiagonalOperator(_diag(800, 200))
    r = projection_curvatures(op, 2000, generator=torch.Generator().manual_seed(1))
    assert r.saddle_fraction <= 0.002
    assert r.trace_estimate == pytest.approx(600, rel=0.01)
    assert abs(r.trace_estimate - 600) < 4 * r.trace_stderr
    # Var((ηᵀHη + δᵀHδ)/2) = tr(H²) = 1000 for Gaussian directions
    assert r.trace_stderr == pytest.approx(math.sqrt(1000 / 2000), rel=0.1)
    # κ±(⟨P⟩) → tr H · I, while ⟨κ±⟩ keep the spread of the individual projections
    assert r.mean_matrix_kappa_plus == pytest.approx(600, rel=0.01)
    assert r.mean_matrix_kappa_minus == pytest.approx(600, rel=0.01)
    assert r.mean_kappa_plus - r.mean_kappa_minus > 50


def test_matrices_and_curvatures_match_dense_computation(helpers):
    d = 30
    g = torch.Generator().manual_seed(3)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    h = (a + a.T) / 2
    r = projection_curvatures(
        helpers.DenseOperator(h), 10, block_size=3, generator=torch.Generator().manual_seed(4)
    )
    g = torch.Generator().manual_seed(4)
    z = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(20)]
    for k in range(10):
        eta, delta = z[2 * k], z[2 * k + 1]
        expected = torch.stack(
            [
                torch.stack([eta @ h @ eta, eta @ h @ delta]),
                torch.stack([delta @ h @ eta, delta @ h @ delta]),
            ]
        ).numpy()
        np.testing.assert_allclose(r.matrices[k], expected, rtol=1e-10, atol=1e-10)
        lo, hi = np.linalg.eigvalsh(expected)
        assert r.kappa_plus[k] == pytest.approx(hi, rel=1e-10, abs=1e-10)
        assert r.kappa_minus[k] == pytest.approx(lo, rel=1e-10, abs=1e-10)
    saddles = np.mean([np.linalg.det(m) < 0 for m in r.matrices])
    assert r.saddle_fraction == pytest.approx(saddles)


def test_trace_estimate_unbiased_on_dense_matrix_and_matvec_only_operator(helpers):
    d = 40
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eig = torch.linspace(-2, 5, d, dtype=torch.float64)
    h = q @ torch.diag(eig) @ q.T
    r = projection_curvatures(
        helpers.DenseOperator(h), 3000, generator=torch.Generator().manual_seed(6)
    )
    assert abs(r.trace_estimate - eig.sum().item()) < 4 * r.trace_stderr
    assert r.mean_matrix_kappa_plus == pytest.approx(eig.sum().item(), rel=0.05)
    rng = torch.random.get_rng_state()
    projection_curvatures(helpers.DenseOperator(h), 3)
    assert torch.equal(rng, torch.random.get_rng_state())
    diag_only = helpers.DiagonalOperator(eig, with_matmat=False)
    with_mm = helpers.DiagonalOperator(eig)
    r1 = projection_curvatures(diag_only, 7, generator=torch.Generator().manual_seed(7))
    r2 = projection_curvatures(with_mm, 7, generator=torch.Generator().manual_seed(7))
    np.testing.assert_allclose(r1.matrices, r2.matrices, rtol=1e-12)


def test_projection_curvatures_bad_arguments(helpers):
    op = helpers.DiagonalOperator(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_projections"):
        projection_curvatures(op, 1)
    with pytest.raises(ValueError, match="block_size"):
        projection_curvatures(op, 4, block_size=0)


def test_hvp_free_trace_exact_for_quadratic_loss(helpers):
    # Linear regression with MSE: the loss is exactly quadratic, so the fit recovers uᵀHu for
    # any radius and the estimate is unbiased for tr H (from torch.func.hessian).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randn(64, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(6, 1).double()
    loss_fn = nn.MSELoss()
    _, hess = helpers.flat_hessian(model, loss_fn, (x, y))
    true_trace = torch.trace(hess).item()
    r = projection_trace_hvp_free(
        model, loss_fn, (x, y), 400, radius=0.5, generator=torch.Generator().manual_seed(1)
    )
    assert abs(r.value - true_trace) < 4 * r.stderr
    assert r.value == pytest.approx(true_trace, rel=0.15)
    assert r.fit_rmse.max() < 1e-10
    assert r.num_forward == 400 * 4 + 1
    assert r.dim == 7 and r.curvatures.shape == (400,)


def test_hvp_free_trace_on_a_smooth_network(helpers):
    model, data = helpers.trained_tanh_net(seed=0, steps=200, width=8)
    loss_fn = nn.MSELoss()
    _, hess = helpers.flat_hessian(model, loss_fn, data)
    true_trace = torch.trace(hess).item()
    r = projection_trace_hvp_free(
        model, loss_fn, data, 300, radius=1e-2, generator=torch.Generator().manual_seed(2)
    )
    assert abs(r.value - true_trace) < 4 * r.stderr
    # each fitted curvature is uᵀHu to high accuracy at this radius
    units = torch.randn(
        300, hess.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    units = units / units.norm(dim=1, keepdim=True)
    exact = torch.einsum("ij,jk,ik->i", units, hess, units).numpy()
    np.testing.assert_allclose(r.curvatures, exact, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_directions": 1, "radius": 1.0}, "num_directions"),
        ({"num_directions": 3, "radius": 0.0}, "radius"),
        ({"num_directions": 3, "radius": 1.0, "num_points": 4}, "num_points"),
        ({"num_directions": 3, "radius": 1.0, "num_points": 1}, "num_points"),
    ],
)
def test_hvp_free_bad_arguments(kwargs, match):
    model = nn.Linear(2, 1)
    data = (torch.randn(4, 2), torch.randn(4, 1))
    with pytest.raises(ValueError, match=match):
        projection_trace_hvp_free(model, nn.MSELoss(), data, **kwargs)
