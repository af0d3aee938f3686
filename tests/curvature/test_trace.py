"""Hutchinson and Hutch++ against exact traces and closed-form variances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_curvature.curvature import HessianOperator, hutchinson_trace, hutchpp_trace
from tests.curvature.ground_truth import MatrixOp, make_case, true_hessian


def random_symmetric(d: int, eigs: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * eigs) @ q.T


def test_hutchinson_stderr_matches_closed_form_variance():
    d, m = 60, 40
    a = random_symmetric(d, torch.linspace(-1.0, 3.0, d, dtype=torch.float64), seed=0)
    exact = float(torch.trace(a))
    sd_closed = math.sqrt(2 * (float((a**2).sum()) - float((torch.diag(a) ** 2).sum())) / m)
    results = [hutchinson_trace(MatrixOp(a), m, generator=s) for s in range(300)]
    errors = np.array([r.value - exact for r in results])
    stderrs = np.array([r.stderr for r in results])
    assert abs(errors.mean()) < 4 * sd_closed / math.sqrt(len(results))  # unbiased
    assert errors.std() == pytest.approx(sd_closed, rel=0.15)
    assert stderrs.mean() == pytest.approx(sd_closed, rel=0.1)  # honest stderr
    assert all(r.num_matvecs == m and r.num_probes == m for r in results)


def test_hutchpp_unbiased_with_honest_stderr():
    d, m = 80, 30
    a = random_symmetric(d, torch.linspace(-2.0, 2.0, d, dtype=torch.float64) ** 3, seed=1)
    exact = float(torch.trace(a))
    results = [hutchpp_trace(MatrixOp(a), m, generator=s) for s in range(300)]
    errors = np.array([r.value - exact for r in results])
    stderrs = np.array([r.stderr for r in results])
    assert abs(errors.mean()) < 4 * errors.std() / math.sqrt(len(results))
    assert np.mean(np.abs(errors) <= 2 * stderrs) > 0.85
    assert stderrs.mean() == pytest.approx(errors.std(), rel=0.3)
    assert results[0].num_matvecs == m and results[0].num_probes == m - 2 * (m // 3)


def test_hutchpp_error_shrinks_faster_on_decaying_spectrum():
    d = 300
    eigs = 1.0 / torch.arange(1, d + 1, dtype=torch.float64) ** 2
    a = random_symmetric(d, eigs, seed=2)
    exact = float(torch.trace(a))

    def mean_abs_error(fn, m):
        return np.mean([abs(fn(MatrixOp(a), m, generator=s).value - exact) for s in range(30)])

    hutch = [mean_abs_error(hutchinson_trace, m) for m in (30, 240)]
    hpp = [mean_abs_error(hutchpp_trace, m) for m in (30, 240)]
    assert hpp[1] < hutch[1] / 10
    assert hpp[0] / hpp[1] > 2 * hutch[0] / hutch[1]  # ~1/m against ~1/sqrt(m)


@pytest.mark.parametrize("name", ["tanh_mlp_ce", "conv_bn_ce"])
def test_trace_on_model_hessians(name):
    model, loss, x, y = make_case(name)
    exact = float(torch.trace(true_hessian(model, loss, x, y)))
    op = HessianOperator(model, loss, (x, y))
    for est in (
        hutchinson_trace(op, 200, generator=0, block_size=64),
        hutchpp_trace(op, 60, generator=torch.Generator().manual_seed(1), block_size=25),
    ):
        assert abs(est.value - exact) < 4 * est.stderr
        assert est.stderr < 0.5 * abs(exact)
    assert op.num_matvecs == 260


def test_seeds_reproduce_and_global_rng_untouched():
    a = random_symmetric(20, torch.arange(20, dtype=torch.float64), seed=3)
    state = torch.get_rng_state()
    assert hutchinson_trace(MatrixOp(a), 5, generator=7).value == (
        hutchinson_trace(MatrixOp(a), 5, generator=7).value
    )
    assert hutchpp_trace(MatrixOp(a), 9, generator=7).value == (
        hutchpp_trace(MatrixOp(a), 9, generator=7).value
    )
    hutchinson_trace(MatrixOp(a), 5)
    assert torch.equal(state, torch.get_rng_state())
    # a sketch as large as the matrix makes Hutch++ exact
    full = hutchpp_trace(MatrixOp(a), 70, generator=0)
    assert full.value == pytest.approx(float(torch.trace(a)), rel=1e-12)


def test_bad_arguments():
    op = MatrixOp(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_trace(op, 1)
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp_trace(op, 3)
    with pytest.raises(ValueError, match="block_size"):
        hutchinson_trace(op, 4, block_size=0)
    with pytest.raises(ValueError, match="generator"):
        hutchinson_trace(op, 4, generator="seed")
    with pytest.raises(ValueError, match="dim"):
        hutchinson_trace(object(), 4)
