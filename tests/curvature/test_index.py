"""The Hessian index from SLQ against exact indices of materialized float64 Hessians."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_curvature.curvature import (
    GGNOperator,
    HessianOperator,
    lanczos,
    parallel_lanczos,
    spectral_density,
    spectrum_decomposition,
)
from tests.curvature.ground_truth import CASES, MatrixOp, make_case, true_ggn, true_hessian


def wide_tanh(n: int = 8, seed: int = 0):
    """131 parameters fitted to 8 points: a large null space (the atom at zero)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (n,), generator=gen)


NETWORKS = [*CASES, "wide_tanh"]


def network(name):
    return wide_tanh() if name == "wide_tanh" else make_case(name)


@pytest.mark.parametrize("name", NETWORKS)
def test_index_matches_exact_fraction_below_tau(name):
    model, loss, x, y = network(name)
    eigs = torch.linalg.eigvalsh(true_hessian(model, loss, x, y))
    op = HessianOperator(model, loss, (x, y))
    sd = spectral_density(op, num_iters=op.dim, num_runs=240, generator=0)
    idx = sd.index()
    exact = float((eigs < -idx.tau).double().mean())
    assert idx.tau == sd.tau and idx.num_runs == 240
    # a full-length run resolves every node: τ is the rounding floor, far below the smallest
    # nonzero |λ|, so the count is the exact index (numerically-zero eigenvalues excluded)
    nonzero = eigs[eigs.abs() > 1e-9 * eigs.abs().max()]
    assert idx.tau < float(nonzero.abs().min())
    assert abs(idx.value - exact) <= 0.02
    assert 3 * idx.stderr < 0.02


def test_truncated_runs_state_their_resolution():
    model, loss, x, y = wide_tanh()
    eigs = torch.linalg.eigvalsh(true_hessian(model, loss, x, y))
    zero = float((eigs.abs() < 1e-12).double().mean())
    assert zero > 0.1  # the null-space atom that broadening splits in half
    sd = spectral_density(HessianOperator(model, loss, (x, y)), num_iters=60, num_runs=240,
                          generator=1)  # fmt: skip
    idx = sd.index()
    assert idx.tau > 1e-6  # the unconverged node at the atom leaves its sign open
    assert abs(idx.value - float((eigs < -idx.tau).double().mean())) <= 0.02
    # the broadened mass below zero is not the index
    exact_index = float((eigs < -1e-12).double().mean())
    assert abs(sd.negative_fraction() - exact_index) > 0.04
    assert sd.index(tau=0.0).value > idx.value  # the atom's node below zero is counted
    with pytest.raises(ValueError, match="tau"):
        sd.index(tau=-1.0)


def test_parallel_lanczos_equals_sequential_runs():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    a = (a + a.T) / 2
    starts = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    block = parallel_lanczos(MatrixOp(a), 25, starts)
    for r, res in enumerate(block):
        one = lanczos(MatrixOp(a), 25, v0=starts[:, r])
        assert torch.allclose(res.alphas, one.alphas, atol=1e-10)
        assert torch.allclose(res.betas, one.betas, atol=1e-10)
    low_rank = torch.diag(torch.tensor([3.0, -1.0] + [0.0] * 10, dtype=torch.float64))
    short = parallel_lanczos(MatrixOp(low_rank), 10, starts[:12])
    assert all(r.num_iters <= 3 for r in short)  # invariant subspaces end runs early
    sd1 = spectral_density(MatrixOp(a), num_iters=20, num_runs=6, generator=4, runs_per_block=1)
    sd6 = spectral_density(MatrixOp(a), num_iters=20, num_runs=6, generator=4)
    assert torch.allclose(sd1.nodes, sd6.nodes, atol=1e-10)
    assert torch.allclose(sd1.weights, sd6.weights, atol=1e-10)


def test_spectrum_decomposition_traces_and_psd_part():
    model, loss, x, y = make_case("tanh_mlp_ce")
    h, g = true_hessian(model, loss, x, y), true_ggn(model, loss, x, y)
    dec = spectrum_decomposition(
        HessianOperator(model, loss, (x, y)),
        GGNOperator(model, loss, (x, y)),
        num_iters=h.shape[0],
        num_runs=40,
        trace_matvecs=3 * h.shape[0] + 3,  # sketch spans the space: exact traces
        generator=0,
    )
    for est, mat in ((dec.trace_hessian, h), (dec.trace_gauss_newton, g),
                     (dec.trace_residual, h - g)):  # fmt: skip
        assert est.value == pytest.approx(float(torch.trace(mat)), abs=1e-8)
    idx = dec.indices()
    assert idx["gauss_newton"].value == 0.0  # PSD: no node below −τ
    for part, mat in (("hessian", h), ("residual", h - g)):
        exact = float((torch.linalg.eigvalsh(mat) < -idx[part].tau).double().mean())
        assert abs(idx[part].value - exact) <= 3 * idx[part].stderr + 0.01
    # first moments: (1/d) tr of each part
    d = h.shape[0]
    mean = float(torch.trace(h - g)) / d
    assert abs(dec.residual.moment(1) - mean) < 4 * dec.residual.moment_stderr(1)
    assert dec.num_matvecs > 0
