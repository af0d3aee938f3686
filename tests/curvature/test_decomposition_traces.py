"""Traces of H = H₀ + H₁ on one sketch: additive, unbiased against materialized H and GGN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_curvature.curvature import DenseOperator, GGNOperator, HessianOperator
from lightning_curvature.curvature.decomposition import (
    decomposition_traces,
    spectrum_decomposition,
)
from tests.curvature.ground_truth import make_case, true_ggn, true_hessian, with_spectrum


class Counting(DenseOperator):
    def __init__(self, a):
        super().__init__(a)
        self.columns = 0

    def _matmat(self, matrix):
        self.columns += matrix.shape[1]
        return super()._matmat(matrix)


def test_parts_add_up_and_are_unbiased_against_materialized_matrices():
    model, loss, x, y = make_case("mse_regression")
    h, g = true_hessian(model, loss, x, y), true_ggn(model, loss, x, y)
    exact = [float(torch.trace(m)) for m in (h, g, h - g)]
    assert abs(exact[2]) > 1e-3  # a residual worth measuring
    hop, gop = HessianOperator(model, loss, (x, y)), GGNOperator(model, loss, (x, y))
    values, errs = [], []
    for seed in range(60):
        th, tg, tr = decomposition_traces(hop, gop, 12, generator=seed)
        assert th.value == pytest.approx(tg.value + tr.value, rel=1e-10, abs=1e-12)
        values.append([th.value, tg.value, tr.value])
        errs.append([th.stderr, tg.stderr, tr.stderr])
    values, errs = np.asarray(values), np.asarray(errs)
    spread = values.std(axis=0, ddof=1)
    assert np.all(np.abs(values.mean(axis=0) - exact) < 4 * spread / np.sqrt(len(values)) + 1e-9)
    assert np.all(errs.mean(axis=0) < 3 * spread + 1e-9)


def test_products_taken_and_counted():
    a = with_spectrum(torch.linspace(-1.0, 4.0, 30), 1)
    b = with_spectrum(torch.linspace(0.0, 3.0, 30), 2)
    ha, gb = Counting(a), Counting(b)
    th, tg, tr = decomposition_traces(ha, gb, 20, generator=0)
    # s = 6 sketch columns, s + g = 6 + 8 for the block: H takes 20, H₀ takes 14
    assert (ha.columns, gb.columns) == (20, 14)
    assert (th.num_matvecs, tg.num_matvecs, tr.num_matvecs) == (20, 14, 14)
    assert th.num_probes == tg.num_probes == tr.num_probes == 8
    full = decomposition_traces(DenseOperator(a), DenseOperator(b), 3 * 30 + 3, generator=1)
    for est, m in zip(full, (a, b, a - b), strict=True):
        assert est.value == pytest.approx(float(torch.trace(m)), abs=1e-9)
    dec = spectrum_decomposition(Counting(a), Counting(b), num_iters=10, num_runs=2,
                                 trace_matvecs=20, num_points=64, generator=0)  # fmt: skip
    assert dec.num_matvecs == 10 * 2 * 4 + 20 + 14
    with pytest.raises(ValueError, match="same space"):
        decomposition_traces(DenseOperator(a), DenseOperator(torch.eye(3)), 20)
    with pytest.raises(ValueError, match="num_matvecs"):
        decomposition_traces(DenseOperator(a), DenseOperator(b), 3)
