"""HessianOperator / GGNOperator against materialized float64 matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature.curvature import (
    GGNOperator,
    HessianOperator,
    NondeterministicModelError,
)
from tests.curvature.ground_truth import CASES, make_case, true_ggn, true_hessian

METHODS = ["double_backward", "forward_over_reverse", "linearize"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def probes(dim: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_materialized_hessian(name, method):
    model, loss, x, y = make_case(name)
    hess = true_hessian(model, loss, x, y)
    op = HessianOperator(model, loss, (x, y), method=method)
    assert op.dim == hess.shape[0] and op.dtype == torch.float64
    v = probes(op.dim, 5)
    assert rel(op.matvec(v[:, 0]), hess @ v[:, 0]) < 1e-10
    assert rel(op.matmat(v), hess @ v) < 1e-10
    assert rel(op @ v, hess @ v) < 1e-10
    assert op.num_matvecs == 1 + 5 + 5


@pytest.mark.parametrize("name", CASES)
def test_ggn_matches_materialized_ggn(name):
    model, loss, x, y = make_case(name)
    ggn = true_ggn(model, loss, x, y)
    op = GGNOperator(model, loss, (x, y))
    v = probes(op.dim, 4)
    assert rel(op.matmat(v), ggn @ v) < 1e-10
    assert rel(op.matvec(v[:, 1]), ggn @ v[:, 1]) < 1e-10
    assert torch.linalg.eigvalsh(op.to_dense()).min() > -1e-10  # PSD for convex losses


def test_ggn_differs_from_hessian_away_from_zero_loss():
    model, loss, x, y = make_case("tanh_mlp_ce")
    h = HessianOperator(model, loss, (x, y)).to_dense()
    g = GGNOperator(model, loss, (x, y)).to_dense()
    assert rel(g, h) > 1e-3
    assert torch.linalg.eigvalsh(h).min() < -1e-6  # this point is indefinite


@pytest.mark.parametrize("method", METHODS)
def test_batch_split_invariance(method):
    model, loss, x, y = make_case("conv_bn_ce", n=30)
    hess = true_hessian(model, loss, x, y)
    v = probes(hess.shape[0], 3)
    uneven = [(x[:7], y[:7]), (x[7:20], y[7:20]), (x[20:], y[20:])]
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    for data in (uneven, loader):
        op = HessianOperator(model, loss, data, method=method)
        assert rel(op.matmat(v), hess @ v) < 1e-10
    gop = GGNOperator(model, loss, uneven)
    assert rel(gop.matmat(v), true_ggn(model, loss, x, y) @ v) < 1e-10


@pytest.mark.parametrize("budget", ["none", "partial", "unlimited"])
def test_graph_budget_does_not_change_products(budget):
    model, loss, x, y = make_case("tanh_mlp_ce", n=40)
    hess = true_hessian(model, loss, x, y)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    v = probes(hess.shape[0], 3)
    for cls, truth in ((HessianOperator, hess), (GGNOperator, true_ggn(model, loss, x, y))):
        one = cls(model, loss, batches[:1])
        one.matvec(v[:, 0])
        per_batch = one.graph_bytes
        limit = {"none": 0, "partial": int(2.5 * per_batch), "unlimited": None}[budget]
        op = cls(model, loss, batches, graph_memory_budget=limit)
        for _ in range(2):  # second call goes through kept graphs when the budget allows
            assert rel(op.matmat(v), truth @ v) < 1e-10
            assert rel(op.matvec(v[:, 0]), truth @ v[:, 0]) < 1e-10
        expected = {"none": 0, "partial": 2 * per_batch, "unlimited": 4 * per_batch}[budget]
        assert per_batch > 0 and op.graph_bytes == pytest.approx(expected, rel=0.2)


def snapshot(model: nn.Module):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: b.detach().clone() for n, b in model.named_buffers()},
        {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
    )


def assert_same(a, b):
    for d1, d2 in zip(a[:3], b[:3], strict=True):
        assert d1.keys() == d2.keys()
        for k in d1:
            if d1[k] is None:
                assert d2[k] is None
            else:
                assert torch.equal(d1[k], d2[k])
    assert a[3] == b[3]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eval_mode", [True, False, None])
def test_no_side_effects(method, eval_mode):
    model, loss, x, y = make_case("conv_bn_ce")
    model.train()
    model.bn.eval()  # a mixed mode must come back exactly
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = snapshot(model)
    rng = torch.get_rng_state()
    for cls in (HessianOperator, GGNOperator):
        kwargs = {"method": method} if cls is HessianOperator else {}
        op = cls(model, loss, (x, y), eval_mode=eval_mode, **kwargs)
        op.matmat(probes(op.dim, 2))
        op.matvec(probes(op.dim, 1)[:, 0])
        op.to_scipy().matvec(np.ones(op.dim))
    assert_same(before, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())


def test_eval_mode_uses_running_statistics():
    model, loss, x, y = make_case("conv_bn_ce")
    model.train()
    h_eval = true_hessian(model.eval(), loss, x, y)
    h_train = true_hessian(model.train(), loss, x, y)
    assert rel(h_eval, h_train) > 1e-3
    model.train()
    v = probes(h_eval.shape[0], 2)
    assert rel(HessianOperator(model, loss, (x, y)).matmat(v), h_eval @ v) < 1e-10
    for method in METHODS:
        op_train = HessianOperator(model, loss, (x, y), eval_mode=False, method=method)
        assert rel(op_train.matmat(v), h_train @ v) < 1e-10


def test_dropout_in_train_mode_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    rng = torch.get_rng_state()
    with pytest.raises(NondeterministicModelError, match="eval_mode"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, y), eval_mode=False)
    with pytest.raises(NondeterministicModelError):
        GGNOperator(model, nn.CrossEntropyLoss(), (x, y), eval_mode=False)
    assert torch.equal(rng, torch.get_rng_state())
    HessianOperator(model, nn.CrossEntropyLoss(), (x, y))  # eval mode: fine
    assert model.training


def test_reduce_fn_weights_by_global_count():
    # Two "ranks" holding the same shard: reduce_fn doubles, global N = 2n, result = H.
    model, loss, x, y = make_case("mse_regression")
    hess = true_hessian(model, loss, x, y)
    calls = []

    def reduce_fn(t):
        calls.append(t.shape)
        return 2 * t

    v = probes(hess.shape[0], 2)
    for cls in (HessianOperator, GGNOperator):
        op = cls(model, loss, (x, y), reduce_fn=reduce_fn)
        assert op.num_samples_global == 2 * x.shape[0]
        truth = hess if cls is HessianOperator else true_ggn(model, loss, x, y)
        assert rel(op.matmat(v), truth @ v) < 1e-10
    assert torch.Size([]) in calls and any(s.numel() == 2 * hess.shape[0] for s in calls)


def test_params_subset():
    model, loss, x, y = make_case("tanh_mlp_ce")
    hess = true_hessian(model, loss, x, y)
    n0 = model[0].weight.numel() + model[0].bias.numel()
    op = HessianOperator(model, loss, (x, y), params=["2.weight", "2.bias"])
    assert op.dim == hess.shape[0] - n0
    v = probes(op.dim, 2)
    assert rel(op.matmat(v), hess[n0:, n0:] @ v) < 1e-10


def test_scipy_bridge_eigsh_agrees():
    model, loss, x, y = make_case("tanh_mlp_ce")
    hess = true_hessian(model, loss, x, y)
    op = HessianOperator(model, loss, (x, y))
    lin = op.to_scipy()
    assert isinstance(lin, LinearOperator) and lin.dtype == np.float64
    out = lin.matvec(np.ones(op.dim, dtype=np.float32))
    assert out.dtype == np.float64
    vals = eigsh(lin, k=2, which="BE", tol=1e-12, return_eigenvectors=False)
    exact = torch.linalg.eigvalsh(hess).numpy()
    np.testing.assert_allclose(sorted(vals), [exact[0], exact[-1]], rtol=1e-8, atol=1e-12)
    block = lin.matmat(np.eye(op.dim)[:, :3])
    np.testing.assert_allclose(block, hess[:, :3].numpy(), atol=1e-12)


def test_float32_model_and_bad_input():
    model, loss, x, y = make_case("tanh_mlp_ce")
    model = model.float()
    op = HessianOperator(model, loss, (x.float(), y))
    assert op.dtype == torch.float32
    assert op.matvec(torch.ones(op.dim, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(ValueError, match="`v` must have shape"):
        op.matvec(torch.ones(op.dim + 1))
    with pytest.raises(ValueError, match="`V` must have shape"):
        op.matmat(torch.ones(op.dim))
    with pytest.raises(ValueError, match="method"):
        HessianOperator(model, loss, (x, y), method="finite_difference")
    with pytest.raises(ValueError, match="graph_memory_budget"):
        HessianOperator(model, loss, (x, y), graph_memory_budget=-1)


@pytest.mark.parametrize("method", METHODS)
def test_vectorized_matmat_agrees(method):
    model, loss, x, y = make_case("conv_bn_ce")
    hess = true_hessian(model, loss, x, y)
    v = probes(hess.shape[0], 3)
    op = HessianOperator(model, loss, (x, y), method=method, vectorize_matmat=True)
    assert rel(op.matmat(v), hess @ v) < 1e-10
    gop = GGNOperator(model, loss, (x, y), vectorize_matmat=True)
    assert rel(gop.matmat(v), true_ggn(model, loss, x, y) @ v) < 1e-10


def test_auto_route_is_fixed_at_construction():
    model, loss, x, y = make_case("conv_bn_ce")
    hess = true_hessian(model, loss, x, y)
    model, x = model.float(), x.float()
    v = probes(hess.shape[0], 30)
    op = HessianOperator(model, loss, (x, y))
    assert op.method == "linearize"  # float32 conv net on CPU, graphs within budget
    assert op.block_route in ("loop", "batched")
    assert set(op.route_seconds) == {"loop", "batched"}
    assert all(t > 0 for t in op.route_seconds.values())
    cols = [op.matvec(v[:, j]) for j in range(25)]
    assert rel(torch.stack(cols, dim=1).double(), hess @ v[:, :25]) < 1e-5
    assert rel(op.matmat(v).double(), hess @ v) < 1e-5
    assert op.method == "linearize" and op.num_matvecs == 55  # never rewritten
    tight = HessianOperator(model, loss, (x, y), graph_memory_budget=1)
    assert tight.method == "double_backward"
    assert rel(tight.matmat(v[:, :3]).double(), hess @ v[:, :3]) < 1e-5
    f64 = HessianOperator(model.double(), loss, (x.double(), y))
    assert f64.method == "forward_over_reverse"
    mlp, mloss, mx, my = make_case("tanh_mlp_ce")
    mop = HessianOperator(mlp, mloss, (mx, my), vectorize_matmat=False)
    mop.matmat(probes(mop.dim, 20))
    assert mop.method == "double_backward" and mop.block_route == "loop"
    assert mop.route_seconds == {}
    assert HessianOperator(mlp, mloss, (mx, my), vectorize_matmat=True).block_route == "batched"


def test_batched_route_in_chunks_agrees(monkeypatch):
    import lightning_curvature.curvature.model_operator as model_operator

    monkeypatch.setattr(model_operator, "MAX_BATCHED_COLUMNS", 3)
    model, loss, x, y = make_case("tanh_mlp_ce")
    hess, ggn = true_hessian(model, loss, x, y), true_ggn(model, loss, x, y)
    v = probes(hess.shape[0], 10)
    for method in METHODS:
        op = HessianOperator(model, loss, (x, y), method=method, vectorize_matmat=True)
        assert rel(op.matmat(v), hess @ v) < 1e-10 and op.num_matvecs == 10
    gop = GGNOperator(model, loss, (x, y), vectorize_matmat=True)
    assert rel(gop.matmat(v), ggn @ v) < 1e-10


def test_auto_block_route_is_measured_per_block_size_on_real_calls(monkeypatch):
    import lightning_curvature.curvature.model_operator as model_operator

    monkeypatch.setattr(model_operator, "_BLOCK_ROUTE_CACHE", {})
    assert [model_operator.block_bucket(k) for k in (2, 3, 8, 9, 32, 33, 100)] == [
        2, 4, 8, 16, 32, 32, 32
    ]  # fmt: skip
    model, loss, x, y = make_case("tanh_mlp_ce")
    hess = true_hessian(model, loss, x, y)
    v = probes(hess.shape[0], 11)
    op = HessianOperator(model, loss, (x, y), method="double_backward")
    assert op.block_routes == {}
    # The deciding call computes half of the columns by each route: all must be right.
    assert rel(op.matmat(v), hess @ v) < 1e-10 and op.num_matvecs == 11
    assert set(op.block_routes) == {16} and op.block_routes[16] in ("loop", "batched")
    assert set(op.block_route_seconds[16]) == {"loop", "batched"}
    assert all(0 < t < math.inf for t in op.block_route_seconds[16].values())
    assert rel(op.matmat(v[:, :3]), hess @ v[:, :3]) < 1e-10  # a new class: decided anew
    assert set(op.block_routes) == {4, 16}
    again = HessianOperator(model, loss, (x, y), method="double_backward")
    again.matmat(v[:, :12])  # same process, same class: the decision is reused
    assert again.block_routes == {16: op.block_routes[16]}
    assert again.block_route_seconds[16] == op.block_route_seconds[16]
    fixed = HessianOperator(model, loss, (x, y), vectorize_matmat=False)
    assert set(fixed.block_routes.values()) == {"loop"} and fixed.route_seconds == {}


class _WithDeadParts(torch.nn.Module):
    """A parameter the loss never reaches, and one whose gradient is a constant (no graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(0.3))
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.unused = nn.Linear(2, 2)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.body(x) + self.shift


def _mean_output(out, targets):  # type: ignore[no-untyped-def]
    """Linear in the outputs: d loss / d shift = 1 exactly, a constant without a graph."""
    return out.mean()


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), _mean_output], ids=["ce", "linear"])
def test_products_through_per_parameter_leaves_with_unused_and_constant_gradients(loss):
    # Ground truth: torch.func.hessian / jacrev of a hand-written flat loss (tests/ground_truth),
    # which differentiates one flat vector. `unused` gets zero rows and columns; under the
    # linear loss so does `shift`, whose gradient then needs no second-order graph at all.
    torch.manual_seed(0)
    model = _WithDeadParts().double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    h_true, g_true = true_hessian(model, loss, x, y), true_ggn(model, loss, x, y)
    h = HessianOperator(model, loss, (x, y)).to_dense()
    g = GGNOperator(model, loss, (x, y)).to_dense()
    torch.testing.assert_close(h, h_true, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_true, rtol=1e-10, atol=1e-12)
    unused = list(range(h.shape[0] - 6, h.shape[0]))  # unused.weight (4), unused.bias (2)
    assert torch.count_nonzero(h[unused]) == 0 and torch.count_nonzero(g[unused]) == 0
    assert torch.count_nonzero(h_true[1:-6, 1:-6]) > 0  # the live block is not trivially zero
