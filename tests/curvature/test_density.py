"""Stochastic Lanczos quadrature against known spectra."""

from __future__ import annotations

import pytest
import torch

from lightning_curvature.curvature import HessianOperator, spectral_density
from tests.curvature.ground_truth import MatrixOp, make_case, true_hessian, with_spectrum


def known_operator():
    gen = torch.Generator().manual_seed(11)
    neg = -0.5 - 1.5 * torch.rand(150, generator=gen, dtype=torch.float64)
    pos = 0.5 + 2.5 * torch.rand(350, generator=gen, dtype=torch.float64)
    eigs = torch.cat([neg, pos])
    return MatrixOp(with_spectrum(eigs, seed=12)), eigs


def test_density_integrates_to_one_and_matches_first_moment():
    op, eigs = known_operator()
    sd = spectral_density(op, num_iters=40, num_runs=20, num_points=2000, generator=0)
    assert sd.nodes.shape == (20, 40) and sd.num_matvecs == 800
    assert torch.allclose(sd.weights.sum(dim=1), torch.ones(20, dtype=torch.float64))
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-6)
    mean = float(eigs.mean())  # tr / d
    assert abs(sd.moment(1) - mean) < 4 * sd.moment_stderr(1)
    assert sd.trace_estimate() == pytest.approx(sd.dim * sd.moment(1))
    first = float(torch.trapezoid(sd.grid * sd.density, sd.grid))
    assert first == pytest.approx(sd.moment(1), abs=1e-6)
    second = float(torch.trapezoid(sd.grid**2 * sd.density, sd.grid))
    assert second == pytest.approx(sd.moment(2) + sd.sigma**2, rel=1e-5)
    assert sd.moment(2) == pytest.approx(float((eigs**2).mean()), rel=0.1)


def test_negative_fraction_of_known_spectrum():
    op, eigs = known_operator()
    sd = spectral_density(op, num_iters=50, num_runs=20, sigma=0.02, generator=1)
    assert float((eigs < 0).double().mean()) == 0.3
    assert sd.negative_fraction() == pytest.approx(0.3, abs=0.03)
    # the closed-form mass agrees with the integral of the grid density below zero
    below = sd.grid <= 0
    grid_mass = float(torch.trapezoid(sd.density[below], sd.grid[below]))
    assert grid_mass == pytest.approx(sd.negative_fraction(), abs=5e-3)
    assert sd.negative_fraction(threshold=-10.0) < 1e-12
    assert sd.negative_fraction(threshold=10.0) == pytest.approx(1.0)


def test_psd_spectrum_has_no_negative_mass():
    eigs = torch.linspace(1.0, 4.0, 200)
    sd = spectral_density(MatrixOp(with_spectrum(eigs)), num_iters=30, num_runs=4, generator=2)
    assert sd.negative_fraction() < 1e-6


def test_small_operator_quadrature_is_exact():
    # k >= dim: the nodes are the eigenvalues; padding for runs that stop early
    eigs = torch.tensor([-1.0, 0.5, 2.0, 3.0])
    sd = spectral_density(MatrixOp(with_spectrum(eigs)), num_iters=10, num_runs=3, generator=3)
    for r in range(3):
        used = sd.weights[r] > 1e-14
        assert torch.allclose(sd.nodes[r][used], eigs.double(), atol=1e-10)


def test_model_hessian_first_moment():
    model, loss, x, y = make_case("tanh_mlp_ce")
    hess = true_hessian(model, loss, x, y)
    op = HessianOperator(model, loss, (x, y))
    sd = spectral_density(op, num_iters=20, num_runs=30, generator=4)
    exact = float(torch.trace(hess)) / hess.shape[0]
    assert abs(sd.moment(1) - exact) < 4 * sd.moment_stderr(1)
    assert sd.num_matvecs == op.num_matvecs


def test_bad_arguments():
    op = MatrixOp(torch.eye(3, dtype=torch.float64))
    for kwargs, word in (
        ({"num_iters": 0}, "num_iters"),
        ({"num_runs": 0}, "num_runs"),
        ({"num_points": 1}, "num_points"),
        ({"sigma": 0.0}, "sigma"),
    ):
        with pytest.raises(ValueError, match=word):
            spectral_density(op, **kwargs)
