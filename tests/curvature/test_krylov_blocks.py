"""Per-block traces of the Krylov-deflated estimator against materialized float64 Hessians."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_curvature.curvature import (
    DenseOperator,
    HessianOperator,
    krylov_deflated_trace,
    lanczos,
)
from tests.curvature.ground_truth import flat_params, make_case, true_hessian, with_spectrum


def exact_blocks(model, hess):
    names, shapes, _ = flat_params(model)
    out, start = {}, 0
    for n, s in zip(names, shapes, strict=True):
        stop = start + s.numel()
        out[n] = (float(torch.trace(hess[start:stop, start:stop])), start, stop)
        start = stop
    return out


def naive_block_traces(hess, basis, blocks):
    """tr_b(QQᵀHQQᵀ) + tr_b(PHP) from dense matrices: the per-block split *without* cross terms."""
    q = basis.to(torch.float64)
    proj = q @ q.T
    perp = torch.eye(hess.shape[0], dtype=torch.float64) - proj
    m = proj @ hess @ proj + perp @ hess @ perp
    return {name: float(torch.diagonal(m)[a:b].sum()) for name, (_, a, b) in blocks.items()}


@pytest.mark.parametrize("name", ["tanh_mlp_ce", "relu_mlp_ce"])
def test_krylov_blocks_match_diagonal_blocks_of_the_hessian(name):
    model, loss, x, y = make_case(name)
    hess = true_hessian(model, loss, x, y)
    exact = exact_blocks(model, hess)
    op = HessianOperator(model, loss, (x, y))
    run = lanczos(op, 8, generator=3)
    est = krylov_deflated_trace(op, run, 3000, generator=4)
    assert [b.name for b in est.blocks] == list(exact)
    assert est.num_matvecs == 3001  # the probes and A q_k
    scale = abs(float(torch.trace(hess)))
    naive = naive_block_traces(hess, run.basis, {n: (0, a, b) for n, (_, a, b) in exact.items()})
    naive_fails = 0
    for b in est.blocks:
        value, start, stop = exact[b.name]
        assert (b.start, b.stop) == (start, stop)
        assert abs(b.value - value) <= 4 * b.stderr + 1e-9 * scale
        naive_fails += abs(naive[b.name] - value) > 4 * b.stderr + 1e-9 * scale
    # the cross terms matter: without them this check fails for some block
    assert naive_fails >= 1
    total = sum(b.value for b in est.blocks)
    assert total == pytest.approx(est.value, rel=1e-9, abs=1e-12)
    assert est.value == pytest.approx(float(torch.trace(hess)), abs=4 * est.stderr)


def test_krylov_blocks_are_exact_on_a_full_krylov_space():
    model, loss, x, y = make_case("tanh_mlp_ce")
    hess = true_hessian(model, loss, x, y)
    exact = exact_blocks(model, hess)
    op = HessianOperator(model, loss, (x, y))
    run = lanczos(op, op.dim, generator=0)
    # the run ends on an invariant subspace (45 of 51: the rest is H's null space)
    assert run.residual_norm == 0.0 and run.basis.shape[1] < op.dim
    est = krylov_deflated_trace(op, run, 2, generator=1)
    assert est.num_matvecs == 2  # no remainder of the Lanczos relation to take
    for b in est.blocks:
        assert b.value == pytest.approx(exact[b.name][0], abs=1e-9)


def test_block_stderr_is_honest_and_blocks_can_be_turned_off():
    a = with_spectrum(torch.cat([torch.tensor([40.0, 15.0, -6.0]), torch.linspace(-1, 2, 47)]), 5)
    blocks = [("first", 0, 10), ("middle", 10, 35), ("last", 35, 50)]
    exact = [float(torch.diagonal(a)[s:e].sum()) for _, s, e in blocks]
    op = DenseOperator(a)
    values, errs = [], []
    for seed in range(200):
        run = lanczos(op, 4, generator=10_000 + seed)
        est = krylov_deflated_trace(op, run, 8, generator=seed, blocks=blocks)
        assert sum(b.value for b in est.blocks) == pytest.approx(est.value, rel=1e-10)
        values.append([b.value for b in est.blocks])
        errs.append([b.stderr for b in est.blocks])
    values, errs = np.asarray(values), np.asarray(errs)
    spread = values.std(axis=0, ddof=1)
    # unbiased per block, and the reported stderr matches the spread of the estimates
    assert np.all(np.abs(values.mean(axis=0) - exact) < 4 * spread / np.sqrt(len(values)))
    assert np.mean(errs, axis=0) == pytest.approx(spread, rel=0.3)
    run = lanczos(op, 4, generator=1)
    off = krylov_deflated_trace(op, run, 8, generator=2, blocks=())
    on = krylov_deflated_trace(op, run, 8, generator=2, blocks=blocks)
    assert off.blocks == () and off.num_matvecs == 8
    assert on.value == pytest.approx(off.value, rel=1e-12)  # blocks do not change the estimate
    assert DenseOperator(a).layout is None
    assert krylov_deflated_trace(op, run, 8, generator=2).blocks == ()  # no layout, no blocks


def test_krylov_blocks_reject_bad_input():
    a = with_spectrum(torch.linspace(1, 3, 12), 0)
    op = DenseOperator(a)
    run = lanczos(op, 3, generator=0)
    with pytest.raises(ValueError, match="blocks"):
        krylov_deflated_trace(op, run, 4, blocks=[("x", 0, 13)])
    with pytest.raises(ValueError, match="basis"):
        krylov_deflated_trace(DenseOperator(torch.eye(5, dtype=torch.float64)), run, 4)
    with pytest.raises(ValueError, match="block_size"):
        krylov_deflated_trace(op, run, 4, block_size=0)


def test_float32_trace_without_blocks_is_unbiased_and_matches_the_float64_route():
    # The default (no-block) path projects in the operator's dtype and sums (Pz)ᵀA(Pz); the
    # block path projects in float64. Same probes (same generator), same estimate to float32
    # rounding; and over seeds the float32 estimate is unbiased for the exact trace.
    eigs = torch.cat([torch.tensor([300.0, 120.0, -20.0]), torch.linspace(-2.0, 5.0, 397)])
    a64 = with_spectrum(eigs, 7)
    exact = float(torch.trace(a64))
    op32 = DenseOperator(a64.to(torch.float32))
    one_block = [("all", 0, 400)]
    values = []
    for seed in range(60):
        run = lanczos(op32, 10, generator=20_000 + seed)
        fast = krylov_deflated_trace(op32, run, 6, generator=seed, blocks=())
        ref = krylov_deflated_trace(op32, run, 6, generator=seed, blocks=one_block)
        assert fast.value == pytest.approx(ref.value, rel=1e-5)
        assert fast.stderr == pytest.approx(ref.stderr, rel=1e-4)
        assert fast.num_matvecs == 6 and ref.num_matvecs == 7
        values.append(fast.value)
    values = np.asarray(values)
    assert abs(values.mean() - exact) < 4 * values.std(ddof=1) / np.sqrt(len(values))
    # deflation did its job: the spread is far below plain Hutchinson's for this spectrum
    off_diagonal = torch.linalg.norm(a64) ** 2 - (a64.diag() ** 2).sum()
    hutchinson_std = float(torch.sqrt(2 * off_diagonal / 6))
    assert values.std(ddof=1) < 0.2 * hutchinson_std
