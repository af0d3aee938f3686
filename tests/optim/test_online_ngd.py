"""OnlineNGD against an independent dense float64 implementation of Povey et al. (2015), app. C.

The reference below forms every D×D matrix the paper writes down (F_t, T_t = η/N XᵀX + (1−η)F_t,
Y_t = R_t T_t) and solves ``β_t X (F_t + α·tr F_t/D·I)⁻¹`` directly, instead of the optimizer's
R×R Woodbury/Z_t route; it shares no code with the package.
"""

from __future__ import annotations

import copy
import io
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_curvature.optim import OnlineNGD

EPS, DELTA = 1e-10, 5e-4


class DenseFactor:
    """F = Rᵀ diag(d) R + ρI kept with R orthonormal, everything dense, float64."""

    def __init__(self, dim: int, rank: int, alpha: float, eta: float = 0.1, period: int = 4):
        self.dim, self.rank, self.alpha, self.eta, self.period = dim, rank, alpha, eta, period
        start = torch.zeros(rank, dim, dtype=torch.float64)
        for j in range(dim):  # [1.1 I, I, I, ...] truncated to dim columns
            start[j % rank, j] = 1.1 if j < rank else 1.0
        self.R = start / start.norm(dim=1, keepdim=True)
        self.d = torch.full((rank,), EPS, dtype=torch.float64)
        self.rho = EPS
        self.t = 0

    def fisher(self) -> torch.Tensor:
        eye = torch.eye(self.dim, dtype=torch.float64)
        return self.R.T @ torch.diag(self.d) @ self.R + self.rho * eye

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fisher()
        kappa = self.alpha * torch.trace(f) / self.dim
        smoothed = f + kappa * torch.eye(self.dim, dtype=torch.float64)
        return torch.linalg.solve(smoothed, x.T).T  # X (F + κI)⁻¹ (scale irrelevant)

    def update(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        t_mat = (self.eta / n) * x.T @ x + (1 - self.eta) * self.fisher()
        y = self.R @ t_mat
        c, u = torch.linalg.eigh(y @ y.T)
        c, u = c.flip(0), u.flip(1)
        c = c.clamp(min=(self.rho * (1 - self.eta)) ** 2)
        sqrt_c = c.sqrt()
        rho = float((torch.trace(t_mat) - sqrt_c.sum()) / (self.dim - self.rank))
        floor = max(EPS, DELTA * float(sqrt_c.max()))
        self.d = (sqrt_c - rho).clamp(min=floor)
        self.rho = max(rho, floor)
        self.R = torch.diag(1 / sqrt_c) @ u.T @ y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.t == 0:
            for _ in range(3):
                self.update(x)
        out = self.apply(x)
        if self.t < 10 or self.t % self.period == 0:
            self.update(x)
        self.t += 1
        return out * (x.norm() / out.norm())

    def w(self) -> torch.Tensor:
        beta = self.rho * (1 + self.alpha) + self.alpha * float(self.d.sum()) / self.dim
        e = 1 / (beta / self.d + 1)
        return torch.diag(e.sqrt()) @ self.R


def _reference_direction(grad: torch.Tensor, factors: dict[int, DenseFactor]) -> torch.Tensor:
    x = grad.double()
    for axis, factor in factors.items():
        moved = x.movedim(axis, -1)  # rows = the other axes (their order does not matter)
        out = factor(moved.reshape(-1, moved.shape[-1]))
        x = out.reshape(moved.shape).movedim(-1, axis)
    return x


def _rank(dim: int) -> int:
    return min((dim + 1) // 2, 80)


class ConvNet(nn.Module):
    """Conv2d 2→3 (3×3) → 2×2 average pool → 12-8-5.

    Without biases every factor sees at least R linearly independent rows per step. With fewer
    (a bias has one row; a Linear(48, 4) weight's 48-wide factor has 4), Y_t Y_tᵀ has eigenvalues
    at rounding level, whose eigenvectors any two implementations resolve differently (they are
    then floored, so this stays harmless, but it is not a comparison to 1e-9).
    """

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=bias)
        self.fc1 = nn.Linear(12, 8, bias=bias)
        self.fc2 = nn.Linear(8, 5, bias=bias)

    def forward(self, x):
        h = nn.functional.avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)))


def _batches(steps: int, dtype=torch.float64, batch: int = 16):
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch, 2, 6, 6, generator=g, dtype=dtype),
            torch.randint(0, 5, (batch,), generator=g),
        )
        for _ in range(steps)
    ]


def _grad_step(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_training_matches_dense_float64_reference_for_25_steps():
    """Conv2d (4 axes) + Linear (2 axes): every axis' factor and the SGD/momentum/L2 wiring."""
    torch.manual_seed(0)
    model = ConvNet().double()
    ref = copy.deepcopy(model)
    lr, mu, wd, alpha = 0.2, 0.5, 1e-3, 0.05
    opt = OnlineNGD(model.parameters(), lr=lr, alpha=alpha, momentum=mu, weight_decay=wd)
    factors = {
        id(p): {a: DenseFactor(n, _rank(n), alpha) for a, n in enumerate(p.shape) if n > 1}
        for p in ref.parameters()
    }
    bufs: dict[int, torch.Tensor] = {}
    for batch in _batches(25):
        _grad_step(model, opt, batch)
        x, y = batch
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                direction = _reference_direction(p.grad + wd * p, factors[id(p)])
                bufs[id(p)] = direction if id(p) not in bufs else mu * bufs[id(p)] + direction
                p -= lr * bufs[id(p)]
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    # the factor states themselves (W up to the signs of its rows: compare WᵀW), d and ρ
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        for axis, state in opt.state[p]["factors"].items():
            dense = factors[id(q)][axis]
            torch.testing.assert_close(state["d"], dense.d, rtol=1e-8, atol=0)
            assert state["rho"] == pytest.approx(dense.rho, rel=1e-8)
            w = dense.w()
            torch.testing.assert_close(state["W"].T @ state["W"], w.T @ w, rtol=1e-7, atol=1e-10)
            assert state["t"] == dense.t == 25


def _factor_after(steps: int, dim: int = 12, rows: int = 30, alpha: float = 0.1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.zeros(rows, dim, dtype=torch.float64))
    opt = OnlineNGD([p], lr=1.0, alpha=alpha)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    for _ in range(steps):
        p.grad = torch.randn(rows, dim, generator=g, dtype=torch.float64) @ mix
        opt.step()
    return opt.state[p]["factors"][1], opt, p


def test_w_rows_are_orthogonal_with_squared_norms_e():
    state, _, _ = _factor_after(15)
    d, rho, w = state["d"], state["rho"], state["W"]
    alpha, dim = 0.1, w.shape[1]
    beta = rho * (1 + alpha) + alpha * float(d.sum()) / dim
    e = 1 / (beta / d + 1)
    torch.testing.assert_close(w @ w.T, torch.diag(e), rtol=0, atol=1e-10)
    assert float(d.min()) >= max(EPS, DELTA * float(d.max())) * (1 - 1e-12)


def test_preconditioned_gradient_keeps_the_frobenius_norm_and_is_the_smoothed_solve():
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(7, 9, 5, dtype=torch.float64))
    opt = OnlineNGD([p], lr=1.0, alpha=0.3)
    for _ in range(12):
        g = torch.randn(7, 9, 5, dtype=torch.float64)
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
        step = before - p.detach()
        assert float(step.norm()) == pytest.approx(float(g.norm()), rel=1e-12)
        assert opt.stats["update_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    assert opt.stats["num_factors"] == 3


def test_huge_alpha_gives_the_sgd_trajectory():
    torch.manual_seed(0)
    model = ConvNet(bias=True).double()
    sgd_model = copy.deepcopy(model)
    opt = OnlineNGD(model.parameters(), lr=0.1, alpha=1e12, momentum=0.9)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)
    for batch in _batches(10):
        _grad_step(model, opt, batch)
        _grad_step(sgd_model, sgd, batch)
    for p, q in zip(model.parameters(), sgd_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_small_alpha_changes_the_direction():
    """Control for the test above: with α = 0.01 the step is not the SGD step."""
    torch.manual_seed(0)
    model = ConvNet().double()
    sgd_model = copy.deepcopy(model)
    opt = OnlineNGD(model.parameters(), lr=0.1, alpha=0.01)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1)
    for batch in _batches(3):
        _grad_step(model, opt, batch)
        _grad_step(sgd_model, sgd, batch)
    gap = max(
        float((p - q).detach().abs().max())
        for p, q in zip(model.parameters(), sgd_model.parameters(), strict=True)
    )
    assert gap > 1e-3


def test_stationary_stream_converges_to_the_top_eigenpairs_of_the_row_covariance():
    dim, rank, rows = 20, 4, 2000
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([40.0, 30.0, 20.0, 10.0]), torch.ones(dim - rank)]).double()
    root = q @ torch.diag(lam.sqrt())  # rows x = root z: covariance q diag(lam) qᵀ
    p = nn.Parameter(torch.zeros(rows, dim, dtype=torch.float64))
    opt = OnlineNGD([p], lr=1.0, alpha=4.0, rank=rank)
    for _ in range(200):
        p.grad = torch.randn(rows, dim, generator=g, dtype=torch.float64) @ root.T
        opt.step()
    state = opt.state[p]["factors"][1]
    r_rows = state["W"] / state["W"].norm(dim=1, keepdim=True)
    top = q[:, :rank]
    # same subspace: the projectors agree
    gap = torch.linalg.matrix_norm(r_rows.T @ r_rows - top @ top.T, ord=2)
    assert float(gap) < 0.05
    torch.testing.assert_close(state["d"] + state["rho"], lam[:rank], rtol=0.05, atol=0)
    assert state["rho"] == pytest.approx(1.0, rel=0.1)


def test_resume_from_state_dict_is_bitwise_identical():
    torch.manual_seed(0)
    model = ConvNet(bias=True)
    twin = copy.deepcopy(model)
    kw = {"lr": 0.05, "alpha": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    batches = _batches(15, dtype=torch.float32)
    opt = OnlineNGD(model.parameters(), **kw)
    for b in batches:
        _grad_step(model, opt, b)
    first = OnlineNGD(twin.parameters(), **kw)
    for b in batches[:7]:
        _grad_step(twin, first, b)
    buffer = io.BytesIO()
    torch.save({"model": twin.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_model = ConvNet(bias=True)
    resumed_model.load_state_dict(saved["model"])
    resumed = OnlineNGD(resumed_model.parameters(), **kw)
    resumed.load_state_dict(saved["opt"])
    for b in batches[7:]:
        _grad_step(resumed_model, resumed, b)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_shape_dtype_and_device(dtype):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        shapes = [(), (1,), (5,), (1, 6), (3, 4), (4, 2, 3, 3)]
        params = [nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes]
        opt = OnlineNGD(params, lr=0.01, alpha=0.01)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        for p in params:
            assert p.dtype == dtype and p.device.type == device and torch.isfinite(p).all()
            for state in opt.state[p]["factors"].values():
                assert state["W"].dtype == dtype and state["W"].device.type == device
        # axes of size 1 and 0-d tensors get no factor: 5 → 1, (1, 6) → 1, (3, 4) → 2, conv → 4
        assert opt.stats["num_factors"] == 8
        assert set(opt.stats) >= {"kappa", "fisher_trace", "update_norm"}
        assert math.isfinite(opt.stats["kappa"]) and opt.stats["kappa"] > 0


def test_stats_kappa_is_alpha_times_mean_factor_trace_over_dim():
    state, opt, _ = _factor_after(11)
    dim = state["W"].shape[1]
    trace = float(state["d"].sum()) + dim * state["rho"]
    # one (rows × dim) tensor: a rows-axis factor and a dim-axis factor
    other = next(
        s for a, s in opt.state[opt.param_groups[0]["params"][0]]["factors"].items() if a == 0
    )
    rows = other["W"].shape[1]
    other_trace = float(other["d"].sum()) + rows * other["rho"]
    assert opt.stats["fisher_trace"] == pytest.approx((trace + other_trace) / 2, rel=1e-12)
    assert opt.stats["kappa"] == pytest.approx(
        0.1 * (trace / dim + other_trace / rows) / 2, rel=1e-12
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"lr": 0.0}, "lr"), ({"lr": "0.1"}, "lr"), ({"alpha": 0.0}, "alpha"), ({"eps": -1.0}, "eps"),
     ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"update_period": 0}, "update_period"),
     ({"eta": 1.0}, "eta"), ({"eta": 0.0}, "eta"), ({"momentum": 1.0}, "momentum"),
     ({"weight_decay": -1e-4}, "weight_decay"), ({"alpha": float("nan")}, "alpha")],
)  # fmt: skip
def test_bad_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        OnlineNGD([nn.Parameter(torch.zeros(3))], **kwargs)
    opt = OnlineNGD([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match=f"`{name}`"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], **kwargs})


SCRIPT = os.path.join(os.path.dirname(__file__), "online_ddp_script.py")


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")
def test_two_gloo_processes_train_like_one(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        proc = subprocess.run(
            [sys.executable, SCRIPT, str(world), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[world] = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    two0, two1 = results[2]
    one = results[1][0]
    # every rank holds identical weights and factor states, bit for bit
    for key in two0["params"]:
        assert torch.equal(two0["params"][key], two1["params"][key])
    for a, b in zip(two0["factors"], two1["factors"], strict=True):
        assert a["t"] == b["t"] and a["rho"] == b["rho"]
        assert torch.equal(a["W"], b["W"]) and torch.equal(a["d"], b["d"])
    # and what one process computes from the full batch (up to reduction-order rounding)
    for key in one["params"]:
        torch.testing.assert_close(two0["params"][key], one["params"][key], rtol=1e-9, atol=1e-11)
    for a, b in zip(two0["factors"], one["factors"], strict=True):
        assert a["rho"] == pytest.approx(b["rho"], rel=1e-7)
        torch.testing.assert_close(a["d"], b["d"], rtol=1e-7, atol=0)
