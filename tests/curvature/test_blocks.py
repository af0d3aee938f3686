"""Per-parameter-tensor traces and eigenvalues against diagonal blocks of materialized Hessians."""

from __future__ import annotations

import pytest
import torch

from lightning_curvature.curvature import (
    HessianOperator,
    block_extreme_eigenpairs,
    hutchinson_trace,
    hutchpp_trace,
    parameter_blocks,
)
from tests.curvature.ground_truth import MatrixOp, flat_params, make_case, true_hessian


def exact_block_traces(model, hess):
    names, shapes, _ = flat_params(model)
    out, start = {}, 0
    for n, s in zip(names, shapes, strict=True):
        stop = start + s.numel()
        out[n] = (float(torch.trace(hess[start:stop, start:stop])), start, stop)
        start = stop
    return out


@pytest.mark.parametrize("name", ["tanh_mlp_ce", "conv_bn_ce"])
def test_block_traces_match_diagonal_blocks(name):
    model, loss, x, y = make_case(name)
    hess = true_hessian(model, loss, x, y)
    exact = exact_block_traces(model, hess)
    op = HessianOperator(model, loss, (x, y))
    assert [b[0] for b in parameter_blocks(op)] == list(exact)
    for est in (hutchinson_trace(op, 400, generator=0), hutchpp_trace(op, 150, generator=1)):
        assert [b.name for b in est.blocks] == list(exact)
        for b in est.blocks:
            value, start, stop = exact[b.name]
            assert (b.start, b.stop) == (start, stop)
            assert abs(b.value - value) <= 4 * b.stderr + 1e-9 * abs(float(torch.trace(hess)))
        total = sum(b.value for b in est.blocks)
        assert total == pytest.approx(est.value, rel=1e-9, abs=1e-12)
        assert est.block_values() == {b.name: b.value for b in est.blocks}


def test_hutchpp_blocks_exact_when_the_sketch_spans_everything():
    model, loss, x, y = make_case("tanh_mlp_ce")
    hess = true_hessian(model, loss, x, y)
    exact = exact_block_traces(model, hess)
    op = HessianOperator(model, loss, (x, y))
    est = hutchpp_trace(op, 3 * op.dim + 6, generator=2)
    for b in est.blocks:
        assert b.value == pytest.approx(exact[b.name][0], abs=1e-9)


def test_blocks_of_a_plain_matrix_and_bad_blocks():
    a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    est = hutchinson_trace(MatrixOp(a), 8, generator=0, blocks=[("first", 0, 4), ("rest", 4, 10)])
    # Rademacher probes on a diagonal matrix: every term is exact
    assert [b.value for b in est.blocks] == pytest.approx([10.0, 45.0])
    assert hutchinson_trace(MatrixOp(a), 4, generator=0).blocks == ()
    for bad in ([("x", 0, 11)], [("x", 3, 3)], [(0, 0, 2)]):
        with pytest.raises(ValueError, match="blocks"):
            hutchpp_trace(MatrixOp(a), 9, blocks=bad)


def test_block_lambda_max_matches_eigh_of_the_block():
    model, loss, x, y = make_case("relu_mlp_ce")
    hess = true_hessian(model, loss, x, y)
    exact = exact_block_traces(model, hess)
    op = HessianOperator(model, loss, (x, y))
    pairs = block_extreme_eigenpairs(op, tol=1e-10, max_iters=300, generator=0)
    assert list(pairs) == list(exact)
    for name, res in pairs.items():
        _, start, stop = exact[name]
        eigs = torch.linalg.eigvalsh(hess[start:stop, start:stop])
        scale = max(float(eigs.abs().max()), 1e-12)
        assert res.lambda_max == pytest.approx(float(eigs[-1]), abs=1e-7 * scale)
        assert res.lambda_min == pytest.approx(float(eigs[0]), abs=1e-7 * scale)
        assert res.v_max.numel() == stop - start
