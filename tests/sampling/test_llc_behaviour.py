"""Behaviour of estimate_llc: paths agree, seeds reproduce, DDP splits merge, nothing leaks."""

from __future__ import annotations

import random
import warnings

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature.sampling import (
    LLCCost,
    LLCEstimate,
    LLCTraces,
    SGLDSettings,
    calibrate_sgld,
    divergence_threshold,
    estimate_llc,
)

matplotlib.use("Agg")


def _classification(dtype=torch.float64, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model, x, y


def _regression(d=2, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.ones(d, 1, dtype=torch.float64) + torch.randn(
        n, 1, generator=g, dtype=torch.float64
    )
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    return model, x, y


def _nll(out, y):
    return 0.5 * ((out - y) ** 2).mean()


COMMON = dict(
    num_chains=3, num_draws=40, num_burnin=10, step_size=1e-3, localization=10.0, warn=False
)


def test_vectorized_and_sequential_paths_agree():
    model, x, y = _classification()
    ce = nn.CrossEntropyLoss()
    fast = estimate_llc(model, ce, (x, y), batch_size=16, vectorize=True, **COMMON)
    slow = estimate_llc(model, ce, (x, y), batch_size=16, vectorize=False, **COMMON)
    assert fast.vectorized and not slow.vectorized
    # Same noise and minibatch streams; only the float rounding of bmm vs mm differs.
    np.testing.assert_allclose(fast.loss_trace, slow.loss_trace, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fast.burnin_trace, slow.burnin_trace, rtol=1e-10, atol=1e-12)
    assert fast.llc_mean == pytest.approx(slow.llc_mean, rel=1e-9)
    assert fast.num_grad_evals == slow.num_grad_evals == 3 * 50


def test_vectorized_and_sequential_agree_in_float32():
    model, x, y = _classification(dtype=torch.float32)
    ce = nn.CrossEntropyLoss()
    fast = estimate_llc(model, ce, (x, y), batch_size=16, vectorize=True, **COMMON)
    slow = estimate_llc(model, ce, (x, y), batch_size=16, vectorize=False, **COMMON)
    np.testing.assert_allclose(fast.loss_trace, slow.loss_trace, rtol=1e-4, atol=1e-5)


def test_reproducible_for_a_seed_and_different_across_seeds():
    model, x, y = _classification()
    ce = nn.CrossEntropyLoss()
    a = estimate_llc(model, ce, (x, y), batch_size=16, seed=5, **COMMON)
    b = estimate_llc(model, ce, (x, y), batch_size=16, seed=5, **COMMON)
    c = estimate_llc(model, ce, (x, y), batch_size=16, seed=6, **COMMON)
    assert np.array_equal(a.loss_trace, b.loss_trace)
    assert a.llc_mean == b.llc_mean
    assert not np.array_equal(a.loss_trace, c.loss_trace)
    # Chains differ from each other (independent streams per chain id).
    assert not np.array_equal(a.loss_trace[0], a.loss_trace[1])


@pytest.mark.parametrize("vectorize", [False, True])
def test_chain_subsets_merge_to_the_single_process_run(vectorize):
    model, x, y = _classification()
    ce = nn.CrossEntropyLoss()
    kw = dict(COMMON, num_chains=4, batch_size=16, seed=3, vectorize=vectorize)
    full = estimate_llc(model, ce, (x, y), **kw)
    part_a = estimate_llc(model, ce, (x, y), chain_indices=[3, 1], **kw)
    part_b = estimate_llc(model, ce, (x, y), chain_indices=[0, 2], **kw)
    merged = LLCEstimate.merge([part_a, part_b])
    assert merged.chain_indices == [0, 1, 2, 3]
    if vectorize:
        np.testing.assert_allclose(merged.loss_trace, full.loss_trace, rtol=1e-12)
        assert merged.llc_mean == pytest.approx(full.llc_mean, rel=1e-10)
    else:
        assert np.array_equal(merged.loss_trace, full.loss_trace)
        assert merged.llc_mean == full.llc_mean
        assert merged.llc_std == full.llc_std
        assert merged.r_hat == full.r_hat
    assert merged.num_grad_evals == full.num_grad_evals
    with pytest.raises(ValueError, match="overlap"):
        LLCEstimate.merge([part_a, part_a])
    other = estimate_llc(model, ce, (x, y), **dict(kw, step_size=2e-3), chain_indices=[0])
    with pytest.raises(ValueError, match="step_size"):
        LLCEstimate.merge([part_a, other])


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


@pytest.mark.parametrize("eval_mode", [True, False])
def test_no_side_effects_on_model_or_global_rng(eval_mode):
    _, x, y = _classification(dtype=torch.float32)
    model = _BNNet()
    with torch.no_grad():
        model(x)  # non-trivial running statistics
    model.train()
    model.fc2.eval()  # a mixed mode must be restored too
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()  # noqa: NPY002 - checking the legacy global stream
    py_state = random.getstate()

    with warnings.catch_warnings():
        # train mode: BatchNorm's in-place statistics and dropout make vmap fall back.
        warnings.simplefilter("ignore", RuntimeWarning)
        est = estimate_llc(
            model, nn.CrossEntropyLoss(), (x, y), batch_size=16, eval_mode=eval_mode, **COMMON
        )
    assert np.isfinite(est.llc_mean)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), torch_state)
    new_np = np.random.get_state()  # noqa: NPY002
    assert new_np[0] == np_state[0] and np.array_equal(new_np[1], np_state[1])
    assert random.getstate() == py_state


class _NeedsItem(nn.Module):
    """A forward pass vmap cannot batch (Python control flow on a tensor value)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1, bias=False).double()

    def forward(self, x):
        if self.lin.weight.sum().item() > -1e30:
            return self.lin(x)
        return -self.lin(x)


def test_vmap_failure_falls_back_to_sequential_with_a_warning():
    _, x, y = _regression()
    model = _NeedsItem()
    with pytest.warns(RuntimeWarning, match="vmap over SGLD chains failed"):
        auto = estimate_llc(model, _nll, (x, y), batch_size=32, **COMMON)
    forced = estimate_llc(model, _nll, (x, y), batch_size=32, vectorize=False, **COMMON)
    assert not auto.vectorized
    assert np.array_equal(auto.loss_trace, forced.loss_trace)
    with pytest.raises(RuntimeError):
        estimate_llc(model, _nll, (x, y), batch_size=32, vectorize=True, **COMMON)


def test_huge_step_size_is_flagged_with_a_warning_not_nan():
    model, x, y = _regression()
    with pytest.warns(RuntimeWarning, match="diverged"):
        est = estimate_llc(
            model, _nll, (x, y), num_chains=3, num_draws=50, num_burnin=0, step_size=10.0
        )
    assert est.diverged_chains == [0, 1, 2]
    assert not est.converged
    assert np.isnan(est.llc_mean)  # undefined, and said so
    assert any("every SGLD chain diverged" in m for m in est.warnings)


def _from_traces(traces, threshold, *, init_loss=1.0, nbeta=100.0, nan_steps=None, warn=True):
    settings = SGLDSettings(
        step_size=1e-3, localization=1.0, nbeta=nbeta, n=1000, batch_size=None, dim=10, seed=0,
        divergence_threshold=threshold,
    )  # fmt: skip
    ids = list(range(traces.shape[0]))
    return LLCEstimate.from_traces(
        LLCTraces.of(traces, np.ones((len(ids), 0)), ids, nan_steps),
        settings,
        init_loss=init_loss,
        cost=LLCCost(num_grad_evals=traces.size, seconds=0.0, vectorized=True),
        warn=warn,
    )


def test_one_runaway_chain_is_excluded_from_the_statistics():
    rng = np.random.default_rng(0)
    traces = 1.0 + 0.01 * rng.standard_normal((4, 100))
    traces[2, 60:] = np.inf
    threshold = divergence_threshold(1.0, dim=10, nbeta=100.0)
    with pytest.warns(RuntimeWarning, match=r"chains \[2\] diverged"):
        est = _from_traces(traces, threshold)
    assert est.diverged_chains == [2]
    healthy = 100.0 * (traces[[0, 1, 3]].mean(axis=1) - 1.0)
    assert est.llc_mean == pytest.approx(healthy.mean())
    assert est.llc_std == pytest.approx(healthy.std(ddof=1))
    # A finite loss far above the threshold counts as runaway too.
    traces[2, 60:] = threshold * 2
    est2 = _from_traces(traces, threshold, warn=False)
    assert est2.diverged_chains == [2]


def test_dataloader_batch_size_is_the_sgld_minibatch_and_cross_entropy_works():
    model, x, y = _classification(dtype=torch.float32)
    loader = DataLoader(TensorDataset(x, y), batch_size=24, shuffle=False)
    est = estimate_llc(model, nn.CrossEntropyLoss(), loader, **COMMON)
    assert est.batch_size == 24
    assert est.n == 96
    assert est.loss_trace.shape == (3, 40) and est.burnin_trace.shape == (3, 10)
    assert est.llc_per_chain.shape == (3,)
    with torch.no_grad():
        full = float(nn.functional.cross_entropy(model(x), y))
    assert est.init_loss == pytest.approx(full, rel=1e-5)
    assert np.isfinite(est.llc_mean) and est.seconds > 0
    # n may be the training-set size when data is a measurement subset.
    est2 = estimate_llc(model, nn.CrossEntropyLoss(), loader, n=60000, **COMMON)
    assert est2.n == 60000 and est2.nbeta == pytest.approx(60000 / np.log(60000))


def test_sampling_a_parameter_subset_leaves_the_rest_at_w_star():
    model, x, y = _classification()
    est = estimate_llc(
        model, nn.CrossEntropyLoss(), (x, y), params=["2.weight", "2.bias"], **COMMON
    )
    assert est.dim == 8 * 3 + 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": float("nan")}, "step_size"),
        ({"localization": -1.0}, "localization"),
        ({"num_chains": 0}, "num_chains"),
        ({"num_draws": 0}, "num_draws"),
        ({"num_burnin": -1}, "num_burnin"),
        ({"batch_size": 0}, "batch_size"),
        ({"nbeta": -2.0}, "nbeta"),
        ({"n": 1}, "`n` must"),
        ({"chain_indices": [0, 7]}, "chain_indices"),
        ({"chain_indices": [1, 1]}, "chain_indices"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, match):
    model, x, y = _regression()
    with pytest.raises(ValueError, match=match):
        estimate_llc(model, _nll, (x, y), **{**COMMON, **kwargs})


def test_calibration_recommends_the_largest_stable_step():
    model, x, y = _regression(d=2, n=200)
    # nβ = 200/ln 200 ≈ 37.7 and Σ̂ ≈ I: the chain is unstable once ε·nβ·h/2 > 2, ε ≳ 0.1.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sweep itself must not spam warnings
        cal = calibrate_sgld(
            model, _nll, (x, y), step_sizes=(1e-3, 1e-2, 3e-2, 0.3, 3.0),
            localizations=(1.0, 10.0), num_steps=100, num_chains=2,
        )  # fmt: skip
    assert len(cal.rows) == 10
    unstable = {r["step_size"] for r in cal.rows if not r["stable"]}
    assert {0.3, 3.0} <= unstable
    # At ε = 0.03 the chain is still bounded, but the discretization inflates λ̂ above d/2 = 1
    # (the stationary variance grows like 1/(1 − ε·nβ·h/4)): flagged, not recommended.
    row = next(r for r in cal.rows if r["step_size"] == 3e-2 and r["localization"] == 1.0)
    assert row["exceeds_bound"] and not row["stable"]
    assert cal.recommended_step_size == 1e-2
    assert cal.recommended_localization == 1.0
    text = cal.table()
    assert "recommended" in text and "step_size" in text
    fig = cal.figure()
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match="step_sizes"):
        calibrate_sgld(model, _nll, (x, y), step_sizes=(0.0,))


def test_calibration_growth_rule_stops_at_the_first_superlinear_jump():
    model, x, y = _regression(d=2, n=200)
    cal = calibrate_sgld(
        model, _nll, (x, y), step_sizes=(1e-3, 1e-2), num_steps=50, num_chains=2,
        localizations=(1.0,), max_growth=1e-3,
    )  # fmt: skip
    # With an absurdly strict growth limit the second step size is rejected by rule 3 only.
    first, second = cal.rows
    assert first["stable"] and not second["exceeds_bound"] and second["num_diverged"] == 0
    assert second["superlinear"] and not second["stable"]
    assert cal.recommended_step_size == 1e-3
