"""Lanczos, extreme eigenpairs and the annihilation method against dense eigendecompositions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh

from lightning_curvature.curvature import (
    GGNOperator,
    HessianOperator,
    extreme_eigenpairs,
    lanczos,
    opposite_sign_eigenpair,
)
from tests.curvature.ground_truth import (
    CASES,
    MatrixOp,
    make_case,
    true_ggn,
    true_hessian,
    with_spectrum,
)


def test_lanczos_relation_and_orthogonality():
    a = with_spectrum(torch.linspace(-3, 5, 120), seed=1)
    res = lanczos(MatrixOp(a), 30, generator=0)
    q, t = res.basis, res.tridiagonal()
    assert res.num_iters == 30 and res.num_matvecs == 30
    assert torch.allclose(q.T @ q, torch.eye(30, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q.T @ a @ q, t, atol=1e-12)
    # A Q = Q T + β q_{k+1} e_kᵀ: the residual lives only in the last column
    resid = a @ q - q @ t
    assert resid[:, :-1].abs().max() < 1e-12
    assert resid[:, -1].norm() == pytest.approx(res.residual_norm, rel=1e-10)


def test_lanczos_keeps_float32_bases_orthogonal_without_ghosts():
    # Many steps past convergence of a dominant outlier: the regime in which the plain
    # recurrence loses orthogonality and repeats the outlier as "ghost" Ritz values.
    eigs = torch.cat([torch.tensor([400.0, 150.0]), torch.linspace(-1.0, 1.0, 398)])
    a = with_spectrum(eigs, seed=4).to(torch.float32)
    op = MatrixOp(a)
    op.dtype = torch.float32
    res = lanczos(op, 120, generator=5)
    q = res.basis.to(torch.float64)
    assert res.basis.dtype == torch.float32 and res.num_iters == 120
    assert (q.T @ q - torch.eye(120, dtype=torch.float64)).abs().max() < 1e-5
    theta = res.ritz()[0]
    assert int((theta > 399.0).sum()) == 1 and int(((theta > 149.0) & (theta < 151.0)).sum()) == 1
    assert float(theta.max()) == pytest.approx(400.0, rel=1e-6)
    # Reference: the same recurrence with two full passes in float64 gives the same T_k.
    ref_t = _two_pass_lanczos_t(a.to(torch.float64), res.basis[:, 0].to(torch.float64), 120)
    assert torch.allclose(res.tridiagonal()[:30, :30], ref_t[:30, :30], atol=1e-3)


def _two_pass_lanczos_t(a, q0, k):
    """Textbook Lanczos with two full Gram–Schmidt passes, float64 (independent of the engine)."""
    qs, alphas, betas = [q0 / q0.norm()], [], []
    for j in range(k):
        w = a @ qs[-1]
        alphas.append(float(qs[-1] @ w))
        basis = torch.stack(qs, dim=1)
        for _ in range(2):
            w = w - basis @ (basis.T @ w)
        if j < k - 1:
            betas.append(float(w.norm()))
            qs.append(w / betas[-1])
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas, dtype=torch.float64)
    return t + torch.diag(off, 1) + torch.diag(off, -1)


def test_lanczos_stops_on_invariant_subspace_and_accepts_v0():
    a = with_spectrum(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), seed=2)
    evecs = torch.linalg.eigh(a).eigenvectors
    res = lanczos(MatrixOp(a), 6, v0=[evecs[:, 0], evecs[:, 5]])
    assert res.num_iters == 2 and res.residual_norm == 0.0
    assert torch.allclose(res.ritz()[0], torch.tensor([1.0, 6.0], dtype=torch.float64))
    full = lanczos(MatrixOp(a), 50, generator=3)
    assert full.num_iters == 6  # capped at dim
    assert torch.allclose(full.ritz()[0], torch.arange(1.0, 7.0, dtype=torch.float64))


@pytest.mark.parametrize("name", CASES)
def test_extremes_of_model_hessians_match_eigh(name):
    model, loss, x, y = make_case(name)
    exact = torch.linalg.eigvalsh(true_hessian(model, loss, x, y))
    op = HessianOperator(model, loss, (x, y))
    res = extreme_eigenpairs(op, tol=1e-9, max_iters=400, generator=0, max_basis=40)
    assert res.converged
    scale = float(exact.abs().max())
    assert abs(res.lambda_max - float(exact[-1])) <= 1e-6 * scale
    assert abs(res.lambda_min - float(exact[0])) <= 1e-6 * scale
    assert res.num_matvecs == op.num_matvecs
    for lam, v, r in ((res.lambda_max, res.v_max, res.residual_max),
                      (res.lambda_min, res.v_min, res.residual_min)):  # fmt: skip
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)
        true_residual = float((op.matvec(v) - lam * v).norm())
        assert true_residual == pytest.approx(r, rel=1e-6, abs=1e-12)


def test_indefinite_hessian_and_annihilation_agree():
    model, loss, x, y = make_case("tanh_mlp_ce")
    exact = torch.linalg.eigvalsh(true_hessian(model, loss, x, y))
    assert exact[0] < 0 < exact[-1]  # a saddle-like point
    op = HessianOperator(model, loss, (x, y))
    ext = extreme_eigenpairs(op, tol=1e-10, generator=1)
    opp = opposite_sign_eigenpair(op, ext.lambda_max, ext.v_max, tol=1e-12, max_iters=20000)
    assert opp.converged
    assert opp.eigenvalue == pytest.approx(ext.lambda_min, rel=1e-6)
    assert abs(float(opp.eigenvector @ ext.v_min)) == pytest.approx(1.0, abs=1e-4)


def test_restarts_reach_a_clustered_small_end():
    # Small end inside a dense cluster: needs many steps, so the basis must restart.
    eigs = torch.cat([torch.tensor([20.0, 12.0]), torch.linspace(-1, 1, 398) ** 3])
    a = with_spectrum(eigs, seed=3)
    exact = torch.linalg.eigvalsh(a)
    op = MatrixOp(a)
    res = extreme_eigenpairs(op, tol=1e-7, max_iters=2000, max_basis=20, generator=0)
    assert res.converged and res.num_restarts > 0
    assert abs(res.lambda_min - float(exact[0])) <= 1e-6 * 20
    assert abs(res.lambda_max - 20.0) <= 1e-6 * 20
    assert op.calls == res.num_matvecs
    assert res.residual_min <= 1e-7 * 20 and res.residual_max <= 1e-7 * 20


def test_budget_exhaustion_is_reported_honestly():
    eigs = torch.cat([torch.tensor([20.0]), torch.linspace(-1, 1, 399) ** 3])
    op = MatrixOp(with_spectrum(eigs, seed=4))
    res = extreme_eigenpairs(op, tol=1e-12, max_iters=15, generator=0)
    assert not res.converged
    assert res.num_matvecs == 15 + 2
    assert res.residual_min > 1e-12 * 20


def test_warm_start_from_previous_vectors():
    eigs = torch.cat([torch.tensor([30.0, 10.0]), torch.linspace(-2, 1, 298)])
    a = with_spectrum(eigs, seed=5)
    cold = extreme_eigenpairs(MatrixOp(a), tol=1e-8, generator=0)
    # the next "epoch": a small perturbation of the matrix
    b = a + 1e-3 * with_spectrum(torch.linspace(-1, 1, 300), seed=6)
    exact = torch.linalg.eigvalsh(b)
    warm = extreme_eigenpairs(MatrixOp(b), tol=1e-8, generator=0, v0=(cold.v_max, cold.v_min))
    cold_b = extreme_eigenpairs(MatrixOp(b), tol=1e-8, generator=0)
    assert warm.converged
    assert warm.lambda_min == pytest.approx(float(exact[0]), rel=1e-6)
    assert warm.lambda_max == pytest.approx(float(exact[-1]), rel=1e-6)
    assert warm.num_matvecs < cold_b.num_matvecs
    # an exact eigenvector as warm start must not trap the iteration in its invariant subspace
    evecs = torch.linalg.eigh(a).eigenvectors
    trap = extreme_eigenpairs(MatrixOp(a), tol=1e-8, generator=0, v0=evecs[:, 100])
    assert trap.lambda_max == pytest.approx(30.0, rel=1e-6)
    assert trap.lambda_min == pytest.approx(-2.0, rel=1e-6)


def test_ggn_is_positive_semidefinite_at_the_low_end():
    model, loss, x, y = make_case("relu_mlp_ce")
    exact = torch.linalg.eigvalsh(true_ggn(model, loss, x, y))
    res = extreme_eigenpairs(GGNOperator(model, loss, (x, y)), tol=1e-10, generator=0)
    assert res.lambda_max == pytest.approx(float(exact[-1]), rel=1e-6)
    assert abs(res.lambda_min) < 1e-8


def test_scipy_eigsh_on_bridge_agrees_with_extremes():
    model, loss, x, y = make_case("conv_bn_ce")
    op = HessianOperator(model, loss, (x, y))
    ours = extreme_eigenpairs(op, tol=1e-10, generator=0)
    vals = eigsh(op.to_scipy(), k=2, which="BE", tol=1e-12, return_eigenvectors=False)
    np.testing.assert_allclose(sorted(vals), [ours.lambda_min, ours.lambda_max], rtol=1e-7)


def test_bad_arguments():
    op = MatrixOp(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_iters"):
        lanczos(op, 0)
    with pytest.raises(ValueError, match="max_iters"):
        extreme_eigenpairs(op, max_iters=0)
    with pytest.raises(ValueError, match="tol"):
        extreme_eigenpairs(op, tol=0.0)
    with pytest.raises(ValueError, match="max_basis"):
        extreme_eigenpairs(op, max_basis=2)
    with pytest.raises(ValueError, match="v0"):
        extreme_eigenpairs(op, v0=torch.ones(4))
    with pytest.raises(ValueError, match="v0"):
        lanczos(op, 3, v0=[])
    with pytest.raises(ValueError, match="eigenvalue"):
        opposite_sign_eigenpair(op, float("nan"))
