"""``at_minimum`` on points whose truth is known, non-finite gradients, and argument checks.

Ground truth for the quadratic models: with L(w) = ½ Σ_k h_k w_k² (w* = 0, exact for every
minibatch) and full-batch SGLD

    w' = w − (ε/2)(nβ h_k + γ) w + √ε ξ,

each coordinate is an AR(1) chain with m_k = 1 − ε·q_k/2, q_k = nβ h_k + γ, whose stationary
variance is v_k = ε / (1 − m_k²) when |m_k| < 1. Then λ = nβ·E[L − L*] = ½ nβ Σ_k h_k v_k,
negative as soon as a negative h_k dominates (a saddle that the localization keeps bounded).
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_curvature.checks import ArgumentError
from lightning_curvature.sampling import (
    LLCCost,
    LLCEstimate,
    LLCTraces,
    SGLDSettings,
    calibrate_sgld,
    divergence_threshold,
    estimate_llc,
)


class _Quadratic(nn.Module):
    """Outputs w itself for every sample; the loss below turns it into ½ Σ h_k w_k²."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1)


def _quadratic_loss(h: list[float]):
    curv = torch.tensor(h, dtype=torch.float64)

    def loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return 0.5 * (curv * out**2).sum(dim=-1).mean()

    return loss


def _truth(h: list[float], nbeta: float, eps: float, gamma: float) -> float:
    total = 0.0
    for hk in h:
        m = 1.0 - 0.5 * eps * (nbeta * hk + gamma)
        assert abs(m) < 1.0  # the chain is stationary
        total += hk * eps / (1.0 - m * m)
    return 0.5 * nbeta * total


def _data(n: int = 200):
    return torch.zeros(n, 1, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)


KW = dict(num_chains=8, num_draws=1500, num_burnin=300, step_size=1e-3, nbeta=100.0)


def test_saddle_is_reported_not_at_a_minimum_with_one_warning():
    h, gamma = [1.0, -2.0], 300.0  # q = (400, 100): bounded, but λ < 0
    truth = _truth(h, 100.0, 1e-3, gamma)
    assert truth < -0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = estimate_llc(_Quadratic(2), _quadratic_loss(h), _data(), localization=gamma, **KW)
    assert est.llc_mean == pytest.approx(truth, abs=4 * est.llc_stderr + 0.05 * abs(truth))
    assert est.at_minimum is False
    assert est.diagnostics.at_minimum is False
    ours = [w for w in caught if "not a local minimum" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "at_minimum=False" in str(ours[0].message)
    assert sum("not a local minimum" in m for m in est.warnings) == 1


def test_true_minimum_is_reported_at_a_minimum():
    h, gamma = [1.0, 2.0], 300.0
    truth = _truth(h, 100.0, 1e-3, gamma)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = estimate_llc(_Quadratic(2), _quadratic_loss(h), _data(), localization=gamma, **KW)
    assert est.llc_mean == pytest.approx(truth, abs=4 * est.llc_stderr + 0.05 * truth)
    assert est.at_minimum is True
    assert not any("not a local minimum" in str(w.message) for w in caught)


def test_unbounded_descent_direction_is_not_a_minimum_even_when_lambda_is_undefined():
    # q_2 = 100·(−5) + 100 < 0: the chain slides down exponentially (loss → −∞, then non-finite).
    est = estimate_llc(
        _Quadratic(2), _quadratic_loss([1.0, -5.0]), _data(), localization=100.0, warn=False,
        **dict(KW, num_chains=2, num_draws=400, num_burnin=0),
    )  # fmt: skip
    assert est.at_minimum is False
    assert est.diagnostics.lowest_loss < est.init_loss - (est.divergence_threshold - est.init_loss)


def _synthetic(traces: np.ndarray, init_loss: float = 1.0, nbeta: float = 100.0):
    threshold = divergence_threshold(init_loss, dim=10, nbeta=nbeta)
    settings = SGLDSettings(
        step_size=1e-3, localization=1.0, nbeta=nbeta, n=1000, batch_size=None, dim=10, seed=0,
        divergence_threshold=threshold,
    )  # fmt: skip
    ids = list(range(traces.shape[0]))
    return LLCEstimate.from_traces(
        LLCTraces.of(traces, np.ones((len(ids), 0)), ids),
        settings,
        init_loss=init_loss,
        cost=LLCCost(traces.size, 0.0, True),
        warn=False,
    )


def test_at_minimum_rule_on_constructed_traces():
    rng = np.random.default_rng(1)
    noise = 0.002 * rng.standard_normal((6, 200))
    # Mean excess +0.01 per draw: λ̂ = 1 > 0.
    assert _synthetic(1.01 + noise).at_minimum
    # λ̂ = −0.5 with s.e. ≈ 0.01: rule 1.
    below = _synthetic(0.995 + noise)
    assert not below.at_minimum and below.llc_mean + below.llc_stderr < 0
    # Overall mean above L*, but the late half below it (still sliding): rule 2 only.
    slide = np.concatenate([np.full((6, 100), 1.03), np.full((6, 100), 0.99)], axis=1) + noise
    est = _synthetic(slide)
    assert est.llc_mean > 0 and est.diagnostics.late_llc < 0 and not est.at_minimum


def test_finite_loss_with_nan_gradient_is_named_as_such():
    # sqrt of the mean squared error at a perfect fit: L = 0 but ∇L = 0/0 = NaN.
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        y = model(x)

    def rmse(out, target):
        return ((out - target) ** 2).mean().sqrt()

    for vectorize in (True, False):
        with pytest.warns(RuntimeWarning, match="non-finite gradient at a finite loss"):
            est = estimate_llc(
                model, rmse, (x, y), num_chains=2, num_draws=10, num_burnin=2, vectorize=vectorize
            )
        assert est.nan_gradient_chains == [0, 1]
        assert est.diverged_chains == []  # not blamed on the step size
        assert est.traces.nan_gradient_step.tolist() == [0, 0]
        assert not any("diverged (" in m for m in est.warnings)
        assert not est.converged and math.isnan(est.llc_mean)


def _regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = x.sum(dim=1, keepdim=True)
    return nn.Linear(2, 1, bias=False).double(), x, y


def _nll(out, y):
    return 0.5 * ((out - y) ** 2).mean()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"step_size": "1e-4"}, "step_size"),
        ({"step_size": float("inf")}, "step_size"),
        ({"localization": float("nan")}, "localization"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -1}, "seed"),
        ({"runaway_factor": float("nan")}, "runaway_factor"),
        ({"runaway_factor": 0.0}, "runaway_factor"),
        ({"chain_indices": []}, "chain_indices"),
        ({"chain_indices": [0.0]}, "chain_indices[0]"),
        ({"num_chains": "4"}, "num_chains"),
        ({"num_chains": True}, "num_chains"),
        ({"num_draws": 2.0}, "num_draws"),
        ({"num_burnin": None}, "num_burnin"),
        ({"nbeta": float("nan")}, "nbeta"),
        ({"nbeta": "10"}, "nbeta"),
        ({"n": 2.5}, "n"),
        ({"batch_size": True}, "batch_size"),
        ({"init_loss": float("nan")}, "init_loss"),
        ({"init_loss_batches": 0}, "init_loss_batches"),
        ({"eval_mode": "yes"}, "eval_mode"),
        ({"vectorize": 1}, "vectorize"),
        ({"warn": None}, "warn"),
    ],
)
def test_bad_arguments_raise_argument_errors_naming_the_argument(kwargs, name):
    model, x, y = _regression()
    with pytest.raises(ArgumentError, match="^" + re.escape(f"`{name}`") + " must be"):
        estimate_llc(model, _nll, (x, y), **{"num_draws": 5, "num_burnin": 0, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"step_sizes": ("1e-3",)}, "step_sizes[0]"),
        ({"step_sizes": ()}, "step_sizes"),
        ({"localizations": (float("nan"),)}, "localizations[0]"),
        ({"max_growth": float("nan")}, "max_growth"),
        ({"num_steps": 0}, "num_steps"),
    ],
)
def test_calibration_arguments_are_checked(kwargs, name):
    model, x, y = _regression()
    with pytest.raises(ArgumentError, match="^" + re.escape(f"`{name}`") + " must be"):
        calibrate_sgld(model, _nll, (x, y), **kwargs)


def test_results_are_frozen_and_typed():
    model, x, y = _regression()
    est = estimate_llc(model, _nll, (x, y), num_chains=2, num_draws=20, num_burnin=5, warn=False)
    with pytest.raises(AttributeError):
        est.llc_mean = 0.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        est.r_hat = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        est.loss_trace[0, 0] = 0.0  # read-only array
    # Flat aliases read the nested records.
    assert est.step_size == est.settings.step_size and est.r_hat is est.diagnostics.r_hat
    assert est.chain_indices == [0, 1] and est.num_draws == 20 and est.num_burnin == 5
    assert est.num_grad_evals == est.cost.num_grad_evals == 50
    cal = calibrate_sgld(model, _nll, (x, y), step_sizes=(1e-4, 1e-3), num_steps=20)
    row = cal.rows[0]
    assert row.step_size == 1e-4 and row["step_size"] == 1e-4
    with pytest.raises(AttributeError):
        row.stable = False  # type: ignore[misc]
    with pytest.raises(KeyError):
        row["nope"]
