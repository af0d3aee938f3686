"""The operator base: checks, composition, restriction, the SciPy bridge and wrapped objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_curvature.curvature import (
    CurvatureOperator,
    DenseOperator,
    HessianOperator,
    OperatorLike,
    as_operator,
    opposite_sign_eigenpair,
)
from tests.curvature.ground_truth import MatrixOp, make_case, true_hessian, with_spectrum


def sym(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (a + a.T) / 2


class Diagonal(CurvatureOperator):
    """A subclass that writes only `_matmat`, as the base promises."""

    def __init__(self, diag: torch.Tensor) -> None:
        super().__init__(diag.numel(), diag.dtype, diag.device)
        self.diag = diag

    def _matmat(self, matrix):
        return self.diag[:, None] * matrix


def test_subclass_gets_products_checks_and_counts():
    op = Diagonal(torch.arange(1.0, 6.0, dtype=torch.float64))
    v = torch.ones(5, dtype=torch.float32)
    assert torch.equal(op.matvec(v), torch.arange(1.0, 6.0, dtype=torch.float64))
    assert (op @ torch.eye(5)).diag().tolist() == [1, 2, 3, 4, 5]
    assert op.matmat(torch.zeros(5, 0)).shape == (5, 0)
    assert op.num_matvecs == 6
    with pytest.raises(ValueError, match="`v` must have shape \\(5,\\)"):
        op.matvec(torch.ones(4))
    with pytest.raises(ValueError, match="`V` must have shape \\(5, k\\)"):
        op.matmat(torch.ones(4, 2))
    assert isinstance(op, OperatorLike)
    lin = op.to_scipy()
    np.testing.assert_allclose(lin.matvec(np.ones(5)), np.arange(1.0, 6.0))


def test_composition_matches_dense_algebra():
    a, b = sym(7, 0), sym(7, 1)
    A, B = DenseOperator(a), DenseOperator(b)
    v = torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eye = torch.eye(7, dtype=torch.float64)
    cases = [
        (2.5 * A, 2.5 * a),
        (A * -1.0, -a),
        (-A, -a),
        (A + B, a + b),
        (A - B, a - b),
        (A.shift(0.75), a - 0.75 * eye),
        (3.0 * (A - B).shift(-1.0), 3.0 * (a - b + eye)),
    ]
    for op, dense in cases:
        assert torch.allclose(op @ v, dense @ v, atol=1e-13)
        assert torch.allclose(op.to_dense(), dense, atol=1e-13)
    assert A.num_matvecs > 0 and B.num_matvecs > 0  # products reach the parts
    with pytest.raises(ValueError, match="same `dim`"):
        A + DenseOperator(sym(3, 0))


def test_restriction_is_the_principal_block():
    a = sym(9, 3)
    op = DenseOperator(a).restrict(2, 6)
    assert op.dim == 4
    assert torch.allclose(op.to_dense(), a[2:6, 2:6], atol=0)
    for bad in ((3, 3), (-1, 4), (0, 10)):
        with pytest.raises(ValueError, match="start:stop"):
            DenseOperator(a).restrict(*bad)


def test_duck_typed_objects_are_wrapped_once():
    a = sym(6, 4)
    duck = MatrixOp(a)
    wrapped = as_operator(duck)
    assert wrapped.dtype == torch.float64 and wrapped.device.type == "cpu"
    assert as_operator(wrapped) is wrapped
    assert torch.allclose(wrapped.matmat(torch.eye(6, dtype=torch.float64)), a)
    assert duck.calls == 6  # no matmat: one matvec per column
    wrapped.matvec(torch.ones(6, dtype=torch.float64))
    assert duck.calls == 7
    with pytest.raises(ValueError, match="dim"):
        as_operator(object())


def test_annihilation_runs_on_the_shifted_composition():
    eigs = torch.cat([torch.tensor([-2.0]), torch.linspace(0.1, 1.0, 30), torch.tensor([5.0])])
    a = with_spectrum(eigs.double(), seed=5)
    res = opposite_sign_eigenpair(DenseOperator(a), 5.0, tol=1e-12, max_iters=2000, generator=0)
    assert res.eigenvalue == pytest.approx(-2.0, abs=1e-8)


def test_hessian_composes_with_its_gauss_newton_part():
    from lightning_curvature.curvature import GGNOperator
    from tests.curvature.ground_truth import true_ggn

    model, loss, x, y = make_case("tanh_mlp_ce")
    h, g = true_hessian(model, loss, x, y), true_ggn(model, loss, x, y)
    residual = HessianOperator(model, loss, (x, y)) - GGNOperator(model, loss, (x, y))
    v = torch.randn(h.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(residual @ v, (h - g) @ v, atol=1e-10)
    assert residual.layout is not None and residual.layout.dim == h.shape[0]


def test_counting_operator_forwards_through_the_base():
    from lightning_curvature.callbacks.progress import CountingOperator
    from lightning_curvature.curvature import hutchpp_trace

    class Tally:
        def __init__(self) -> None:
            self.n = 0

        def update(self, n: int = 1) -> None:
            self.n += n

    model, loss, x, y = make_case("tanh_mlp_ce")
    op = HessianOperator(model, loss, (x, y))
    tally = Tally()
    counted = CountingOperator(op, tally)
    assert not hasattr(CountingOperator, "__getattr__")
    assert (counted.dim, counted.dtype, counted.device) == (op.dim, op.dtype, op.device)
    assert counted.layout is op.layout and counted.op is op
    est = hutchpp_trace(counted, 30, generator=0)
    ref = hutchpp_trace(HessianOperator(model, loss, (x, y)), 30, generator=0)
    assert est.value == pytest.approx(ref.value, rel=1e-12)
    assert [b.name for b in est.blocks] == [b.name for b in ref.blocks]
    assert tally.n == counted.num_matvecs == op.num_matvecs == 30
    counted.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert tally.n == 31
