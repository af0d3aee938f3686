"""λ̂ against learning coefficients known from theory (ground truth shares no code with SGLD).

Tolerances, and why:

* Regular models (linear regression with Gaussian noise): λ = d/2. The issue's bar is 15%. We
  also compare with the exact stationary mean of the *discretized* full-batch chain (a closed
  form for linear-Gaussian SGLD), which removes the O(ε·nβ) discretization bias; what is left is
  Monte Carlo error (a few %), hence 8%.
* Singular 2-parameter models with K(w) = ½·w₁²·w₂^(2p): the localized tempered posterior is
  Gaussian in w₁ given w₂, so its mean excess loss reduces to a 1-D integral that scipy
  evaluates to ~1e-8. That is the exact finite-nβ truth; SGLD must match it within 10% (Monte
  Carlo error ~2–3% with 256 chains, plus the slow mixing along the singular ridges, which biases
  λ̂ low by a few %). The *asymptotic* coefficient is approached only slowly: for a normal
  crossing with multiplicity m, Z(nβ) ∝ (nβ)^(−λ)·(ln nβ)^(m−1), so nβ·E[K] = λ − (m−1)/ln(nβ) +
  O(1/ln²). For f = x·w₁·w₂ (λ = ½, m = 2) we compare with λ − 1/ln(nβ) within 15%; for
  f = x·w₁·w₂² (λ = ¼, m = 1) the correction is a power of nβ and at nβ = 1e4 we compare with
  λ = ¼ itself within 15%.
* Reduced-rank regression (Aoyagi & Watanabe 2005, Neural Networks 18:924): with inputs whose
  sample covariance is exactly I and noise orthogonal to them, L_n(w) − L_n(w*) =
  ½‖BA − C₀‖²_F exactly, so λ̂ at large nβ must approach the Aoyagi–Watanabe value; 10% for the
  zero-truth case, 15% for a rank-1 truth (the finite-nβ correction is larger there).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from torch import nn

from lightning_curvature.sampling import default_nbeta, estimate_llc


def _gaussian_nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # NLL of y ~ N(f(x), I) per sample (up to the constant), averaged over samples.
    return 0.5 * ((outputs - targets) ** 2).sum(dim=-1).mean()


def _ols_problem(d: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, 1, generator=g, dtype=torch.float64)
    y = x @ w_true + torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    return model, x, y


def _discretized_truth(x: torch.Tensor, nbeta: float, eps: float, gamma: float) -> float:
    """nβ·E[L − L*] under the stationary law of the full-batch linear-Gaussian SGLD chain.

    w' − w* = M (w − w*) + √ε ξ with M = I − (ε/2)(nβ Σ̂ + γ I), so Cov = ε (I − M²)⁻¹ and
    E[L − L*] = ½ tr(Σ̂ Cov).
    """
    sigma = (x.T @ x / x.shape[0]).numpy()
    m = np.eye(sigma.shape[0]) - 0.5 * eps * (nbeta * sigma + gamma * np.eye(sigma.shape[0]))
    cov = eps * np.linalg.inv(np.eye(sigma.shape[0]) - m @ m)
    return float(nbeta * 0.5 * np.trace(sigma @ cov))


@pytest.mark.parametrize("d", [2, 10])
def test_linear_regression_llc_is_half_the_dimension(d):
    model, x, y = _ols_problem(d, n=1000, seed=d)
    eps, gamma = 1e-3, 1.0
    est = estimate_llc(
        model, _gaussian_nll, (x, y), num_chains=16, num_draws=1500, num_burnin=200,
        step_size=eps, localization=gamma, seed=1,
    )  # fmt: skip
    assert est.diverged_chains == []
    assert est.llc_mean == pytest.approx(d / 2, rel=0.15)
    truth = _discretized_truth(x, est.nbeta, eps, gamma)
    assert est.llc_mean == pytest.approx(truth, rel=0.08)
    assert est.converged and est.r_hat < 1.05


def test_wbic_on_a_regular_model():
    d, n = 3, 1000
    model, x, y = _ols_problem(d, n=n, seed=7)
    est = estimate_llc(
        model, _gaussian_nll, (x, y), num_chains=16, num_draws=1500, num_burnin=200,
        step_size=1e-3, localization=1.0, seed=2,
    )  # fmt: skip
    assert est.nbeta == pytest.approx(n / math.log(n))
    # Definitionally consistent with λ̂ ...
    assert est.wbic == pytest.approx(n * (est.init_loss + est.llc_mean / est.nbeta), rel=1e-12)
    # ... and with theory: WBIC = n·L_n(w*) + λ·ln n + O_p(1)-free here (λ = d/2, Watanabe 2013).
    with torch.no_grad():
        full_nll = 0.5 * float(((model(x) - y) ** 2).mean())
    assert est.init_loss == pytest.approx(full_nll, rel=1e-12)
    assert (est.wbic - n * full_nll) / math.log(n) == pytest.approx(d / 2, rel=0.15)
    # Off the WBIC temperature the WBIC is undefined.
    other = estimate_llc(
        model, _gaussian_nll, (x, y), num_chains=2, num_draws=20, num_burnin=0,
        step_size=1e-3, localization=1.0, nbeta=2 * default_nbeta(n),
    )  # fmt: skip
    assert other.wbic is None


class _Monomial(nn.Module):
    """f(x) = x·w₁·w₂^p, parameters at the singular point w* = 0."""

    def __init__(self, power: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.w2 = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.power = power

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w1 * self.w2**self.power


def _monomial_truth(nbeta: float, gamma: float, power: int) -> float:
    """nβ·E[K] for K = ½ w₁² w₂^(2p) under exp(−nβK − γ‖w‖²/2), by 1-D quadrature.

    Given w₂ = u the density in w₁ is Gaussian with precision a(u) = nβ u^(2p) + γ, so
    ∫ dw₁ = √(2π/a), E[w₁²|u] = 1/a, and nβ·E[K|u] = ½ nβ u^(2p) / a(u).
    """

    def a(u):
        return nbeta * u ** (2 * power) + gamma

    def weight(u):
        return np.exp(-0.5 * gamma * u * u) / np.sqrt(a(u))

    z = quad(weight, -np.inf, np.inf, limit=500)[0]
    e = quad(lambda u: weight(u) * 0.5 * nbeta * u ** (2 * power) / a(u), -np.inf, np.inf,
             limit=500)[0]  # fmt: skip
    return e / z


def _monomial_data():
    # x ≡ 1 and y ≡ 0: L_n(w) = ½ (w₁ w₂^p)² exactly, realizable, L_n(w*) = 0.
    return torch.ones(8, 1, dtype=torch.float64), torch.zeros(8, 1, dtype=torch.float64)


def test_singular_product_w1_w2():
    nbeta, gamma = 1e3, 1.0
    est = estimate_llc(
        _Monomial(1), _gaussian_nll, _monomial_data(), nbeta=nbeta, localization=gamma,
        step_size=3e-4, num_chains=256, num_draws=2000, num_burnin=1000, seed=0,
    )  # fmt: skip
    truth = _monomial_truth(nbeta, gamma, 1)
    assert est.llc_mean == pytest.approx(truth, rel=0.10)
    # Known coefficient λ = ½ with multiplicity 2: nβ·E[K] ≈ λ − 1/ln(nβ).
    assert est.llc_mean == pytest.approx(0.5 - 1 / math.log(nbeta), rel=0.15)
    # Far below the regular value d/2 = 1: the estimator sees the singularity.
    assert est.llc_mean < 0.5


def test_singular_normal_crossing_w1_w2_squared():
    nbeta, gamma = 1e4, 1.0
    est = estimate_llc(
        _Monomial(2), _gaussian_nll, _monomial_data(), nbeta=nbeta, localization=gamma,
        step_size=2e-4, num_chains=256, num_draws=2000, num_burnin=1000, seed=0,
    )  # fmt: skip
    truth = _monomial_truth(nbeta, gamma, 2)
    assert est.llc_mean == pytest.approx(truth, rel=0.10)
    assert est.llc_mean == pytest.approx(0.25, rel=0.15)  # λ = min(1/2, 1/4), m = 1


def aoyagi_watanabe_rrr(m_out: int, n_in: int, h: int, r: int) -> float:
    """Learning coefficient of reduced-rank regression (Aoyagi & Watanabe 2005, Theorem 1).

    Model y = B A x, A: h×n_in, B: m_out×h, true map of rank r.
    """
    m, n = m_out, n_in
    if n + r <= m + h and m + r <= n + h and h + r <= m + n:
        s = 2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2
        return (s + ((m + n + h + r) % 2)) / 8
    if m + h < n + r:
        return (h * m - h * r + n * r) / 2
    if n + h < m + r:
        return (h * n - h * r + m * r) / 2
    return m * n / 2


def test_aoyagi_watanabe_formula_sanity():
    assert aoyagi_watanabe_rrr(1, 1, 1, 1) == 0.5  # regular: one effective parameter
    assert aoyagi_watanabe_rrr(1, 1, 1, 0) == 0.5  # x·w1·w2
    assert aoyagi_watanabe_rrr(3, 3, 2, 0) == 2.5
    assert aoyagi_watanabe_rrr(4, 3, 2, 1) == 4.0


def _rrr_problem(m_out: int, n_in: int, h: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 32
    q, _ = torch.linalg.qr(torch.randn(n, n_in, generator=g, dtype=torch.float64))
    x = q * math.sqrt(n)  # sample covariance exactly I
    u = torch.randn(m_out, r, generator=g, dtype=torch.float64)
    v = torch.randn(n_in, r, generator=g, dtype=torch.float64)
    u, v = u / u.norm(dim=0), v / v.norm(dim=0)
    noise = torch.randn(n, m_out, generator=g, dtype=torch.float64)
    noise = noise - q @ (q.T @ noise)  # orthogonal to the inputs
    y = x @ (u @ v.T).T + noise
    model = nn.Sequential(nn.Linear(n_in, h, bias=False), nn.Linear(h, m_out, bias=False))
    model = model.double()
    with torch.no_grad():
        # w* on the true set, at its most singular point (unused hidden units exactly zero).
        model[0].weight.zero_()
        model[1].weight.zero_()
        model[0].weight[:r] = v.T
        model[1].weight[:, :r] = u
    return model, x, y


@pytest.mark.parametrize(
    ("shape", "step_size", "rel"), [((3, 3, 2, 0), 1e-4, 0.10), ((4, 3, 2, 1), 3e-5, 0.15)]
)
def test_reduced_rank_regression_aoyagi_watanabe(shape, step_size, rel):
    model, x, y = _rrr_problem(*shape)
    est = estimate_llc(
        model, _gaussian_nll, (x, y), nbeta=1e4, localization=1.0, step_size=step_size,
        num_chains=64, num_draws=2000, num_burnin=1000, seed=0,
    )  # fmt: skip
    truth = aoyagi_watanabe_rrr(*shape)
    m_out, n_in, h, _ = shape
    assert truth < h * (m_out + n_in) / 2  # singular: below d/2
    assert est.llc_mean == pytest.approx(truth, rel=rel)
