"""A tiny run of examples/critical_points_index.py, checked against autograd and eigh."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.func import grad, hessian

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "critical_points_index.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("critical_points_index", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def objective(theta, x, y, n, weight_decay):
    # Written from the example's docstring, not from its code: ŷ = W₂ tanh(W₁x),
    # J = (1/2m) Σ‖ŷ − y‖² + (wd/2)‖θ‖².
    w1 = theta[: n * n].reshape(n, n)
    w2 = theta[n * n :].reshape(n, n)
    out = torch.tanh(x @ w1.T) @ w2.T
    data = 0.5 * ((out - y) ** 2).sum() / x.shape[0]
    return data + 0.5 * weight_decay * (theta**2).sum(), data


def test_closed_form_derivatives_match_autograd(example):
    problem = example.make_problem(3, 0.5, seed=0, weight_decay=1e-2)
    g0 = torch.Generator().manual_seed(1)
    theta = torch.randn(3, problem.dim, dtype=torch.float64, generator=g0)
    value, g, h = example.grad_and_hessian(theta, problem)
    for k in range(3):
        def f(t):
            return objective(t, problem.x, problem.y, 3, 1e-2)[0]

        assert torch.allclose(g[k], grad(f)(theta[k]), atol=1e-12)
        assert torch.allclose(h[k], hessian(f)(theta[k]), atol=1e-12)
        data = objective(theta[k], problem.x, problem.y, 3, 1e-2)[1]
        assert float(value[k]) == pytest.approx(float(data), rel=1e-12)
    assert torch.allclose(example.gradient(theta, problem), g, atol=1e-14)


def test_found_points_are_critical_and_their_index_is_exact(example):
    problem = example.make_problem(3, 0.5, seed=2, weight_decay=1e-3)
    assert problem.m == 12 and problem.phi == pytest.approx(0.5)
    points = example.find_critical_points(
        problem, 24, seed=3, max_gd_steps=300, max_iter=150, tol=1e-9
    )
    assert len(points) >= 3
    for p in points:
        theta = torch.tensor(p.theta, dtype=torch.float64)

        def f(t):
            return objective(t, problem.x, problem.y, 3, 1e-3)[0]

        assert float(grad(f)(theta).norm()) < 1e-8
        eig = torch.linalg.eigvalsh(hessian(f)(theta))
        # The count is not on a knife edge: no eigenvalue within 1e-7 of zero.
        assert float(eig.abs().min()) > 1e-7
        assert p.num_negative == int((eig < 0).sum())
        assert p.index == pytest.approx(p.num_negative / problem.dim)
        data = objective(theta, problem.x, problem.y, 3, 1e-3)[1]
        assert p.energy == pytest.approx(float(data) / 3, rel=1e-10)
    assert len({p.num_negative for p in points}) >= 2  # more than one kind of critical point


def test_three_halves_fit_recovers_a_planted_law(example):
    eps_c, alpha0 = 0.2, 1.7
    pts = [
        example.CriticalPoint(e, alpha0 * (e - eps_c) ** 1.5, 0, 0.0, 1.0, [])
        for e in (0.22, 0.25, 0.3, 0.33, 0.36)
    ]
    fit = example.fit_three_halves(pts, alpha_max=0.5)
    assert fit["eps_c"] == pytest.approx(eps_c, rel=1e-9)
    assert fit["alpha0"] == pytest.approx(alpha0, rel=1e-9)
    assert example.fit_three_halves(pts[:1], alpha_max=0.5) is None
