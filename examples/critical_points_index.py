"""Index of critical points against their loss, for single-hidden-layer tanh networks (seed 004).

Pennington & Bahri ("Geometry of neural network loss surfaces via random matrix theory",
ICML 2017) model the Hessian at a critical point as H = H₀ + H₁, a Wishart (Gauss–Newton) part
plus a Wigner part whose scale grows with the loss, and predict that the index α (fraction of
negative eigenvalues) of critical points grows from zero at a critical energy ε_c as

    α(ε) ≈ α₀ |ε − ε_c|^{3/2}        (small α),

with ε_c falling as the ratio φ of parameters to data points rises (their Fig. 6 fits
ε_c ≈ ½(1 − φ)² for tanh networks). This script repeats their experiment at toy scale:

* network ŷ = W₂ tanh(W₁ x) with n inputs, n hidden units, n outputs (no biases), P = 2n²
  parameters; m random points x ~ N(0, I), targets y ~ N(0, I); φ = P / (n m) = 2n / m;
* loss L = (1/2m) Σ_μ ‖ŷ_μ − y_μ‖², energy ε = L / n (so ε = ½ for the zero network);
* critical points: minimize ‖∇L‖² in float64 by Levenberg–Marquardt on the system ∇L(θ) = 0
  (step −(H² + μI)⁻¹ H ∇L, μ adapted), from many starts; starts are random initializations
  followed by a random number of gradient-descent steps, so that they lie at all loss levels and
  reach critical points of every index. Points with ‖∇L‖ above ``--tol`` are discarded (minima of
  ‖∇L‖² that are not critical points);
* exact index α = #{λ < 0} / P of the materialized Hessian (``torch.linalg.eigvalsh``);
* fit α^{2/3} = α₀^{2/3} (ε − ε_c) by least squares on the points with 0 < α ≤ ``--alpha-max``.

Writes ``critical_points_index.png`` and ``critical_points_index.json`` to ``--out``. A few
minutes on one thread with the defaults.

Run::

    PYTHONPATH=. python examples/critical_points_index.py [--n 6] [--starts 160] \\
        [--out docs/figures]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Problem:
    """Random regression data for an n-n-n tanh network at parameter/data ratio φ = 2n/m."""

    n: int
    m: int
    x: Tensor  # (m, n)
    y: Tensor  # (m, n)
    weight_decay: float = 0.0

    @property
    def dim(self) -> int:
        return 2 * self.n * self.n

    @property
    def phi(self) -> float:
        return self.dim / (self.n * self.m)


@dataclass(frozen=True)
class CriticalPoint:
    """A point with ‖∇L‖ ≤ tol, its energy ε = L/n and exact index α."""

    energy: float
    index: float
    num_negative: int
    grad_norm: float
    min_abs_eigenvalue: float
    theta: list[float]


def make_problem(n: int, phi: float, seed: int, weight_decay: float = 0.0) -> Problem:
    m = round(2 * n / phi)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g, dtype=torch.float64)
    y = torch.randn(m, n, generator=g, dtype=torch.float64)
    return Problem(n, m, x, y, weight_decay)


def loss(theta: Tensor, problem: Problem) -> Tensor:
    """L(θ) = (1/2m) Σ_μ ‖W₂ tanh(W₁ x_μ) − y_μ‖², θ = (vec W₁, vec W₂)."""
    n = problem.n
    w1 = theta[: n * n].reshape(n, n)
    w2 = theta[n * n :].reshape(n, n)
    out = torch.tanh(problem.x @ w1.T) @ w2.T
    return 0.5 * ((out - problem.y) ** 2).sum() / problem.m


def _split(theta: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return theta[..., : n * n].unflatten(-1, (n, n)), theta[..., n * n :].unflatten(-1, (n, n))


def grad_and_hessian(theta: Tensor, problem: Problem) -> tuple[Tensor, Tensor, Tensor]:
    """Data loss L, and gradient and Hessian of J = L + (wd/2)‖θ‖², for a batch θ (S, P).

    Closed form (the autograd Hessian costs ~25 ms per point here, this a fraction of that).

    With z = W₁x, a = tanh z, a′ = 1 − a², a″ = −2a a′, e = W₂a − y and the mean over the m
    points written ⟨·⟩:

    * ∂L/∂W₂[i, j] = ⟨e_i a_j⟩,  ∂L/∂W₁[j, k] = ⟨(W₂ᵀe)_j a′_j x_k⟩;
    * H = H₀ + H₁ with H₀ = ⟨JᵀJ⟩ (J = ∂ŷ/∂θ: ∂ŷ_i/∂W₂[i, j] = a_j,
      ∂ŷ_i/∂W₁[j, k] = W₂[i, j] a′_j x_k) and H₁ = ⟨Σ_i e_i ∂²ŷ_i⟩, whose only nonzero blocks are
      W₁W₁: δ_jj′ ⟨(W₂ᵀe)_j a″_j x_k x_l⟩ and W₁W₂: δ_jj′ ⟨e_i a′_j x_k⟩ (∂²ŷ/∂W₂² = 0).
    """
    n, m, x = problem.n, problem.m, problem.x
    w1, w2 = _split(theta, n)  # (S, h, k), (S, i, h)
    a = torch.tanh(torch.einsum("mk,shk->smh", x, w1))
    d1 = 1 - a * a
    d2 = -2 * a * d1
    e = torch.einsum("smh,sih->smi", a, w2) - problem.y  # (S, m, i)
    back = torch.einsum("smi,sih->smh", e, w2)  # (W₂ᵀe)_j per point
    value = 0.5 * (e * e).sum(dim=(1, 2)) / m
    g1 = torch.einsum("smh,smh,mk->shk", back, d1, x) / m
    g2 = torch.einsum("smi,smh->sih", e, a) / m
    s_ = theta.shape[0]
    eye = torch.eye(n, dtype=theta.dtype)
    j1 = torch.einsum("sih,smh,mk->smihk", w2, d1, x).reshape(s_, m, n, n * n)
    j2 = torch.einsum("ij,smh->smijh", eye, a).reshape(s_, m, n, n * n)
    jac = torch.cat([j1, j2], dim=-1)  # (S, m, i, P)
    h = torch.einsum("smip,smiq->spq", jac, jac) / m
    c11 = torch.einsum("smh,smh,mk,ml->shkl", back, d2, x, x) / m  # W₁W₁, diagonal in h
    c12 = torch.einsum("smi,smh,mk->shki", e, d1, x) / m  # W₁[h,k] with W₂[i,h]
    b11 = torch.einsum("shkl,hg->shkgl", c11, eye).reshape(s_, n * n, n * n)
    b12 = torch.einsum("shki,hg->shkig", c12, eye).reshape(s_, n * n, n * n)
    h[:, : n * n, : n * n] += b11
    h[:, : n * n, n * n :] += b12
    h[:, n * n :, : n * n] += b12.transpose(1, 2)
    wd = problem.weight_decay
    gradient = torch.cat([g1.flatten(1), g2.flatten(1)], dim=1) + wd * theta
    return value, gradient, h + wd * torch.eye(problem.dim, dtype=theta.dtype)


def gradient(theta: Tensor, problem: Problem) -> Tensor:
    """∇J for a batch θ (S, P) without the Hessian (for the gradient-descent starts)."""
    n, m, x = problem.n, problem.m, problem.x
    w1, w2 = _split(theta, n)
    a = torch.tanh(torch.einsum("mk,shk->smh", x, w1))
    e = torch.einsum("smh,sih->smi", a, w2) - problem.y
    back = torch.einsum("smi,sih->smh", e, w2)
    g1 = torch.einsum("smh,mk->shk", back * (1 - a * a), x) / m
    g2 = torch.einsum("smi,smh->sih", e, a) / m
    return torch.cat([g1.flatten(1), g2.flatten(1)], dim=1) + problem.weight_decay * theta


def _starts(problem: Problem, num: int, max_gd_steps: int, g: torch.Generator) -> Tensor:
    """Random θ ~ N(0, s²/n), s ∈ [0.5, 1], then 0..max_gd_steps gradient-descent steps.

    The number of steps is log-uniform, so starts lie at every loss level from the
    initialization down to (nearly) a minimum.
    """
    scale = torch.empty(num, 1, dtype=torch.float64).uniform_(0.5, 1.0, generator=g)
    theta = scale * torch.randn(num, problem.dim, generator=g, dtype=torch.float64)
    theta = theta / math.sqrt(problem.n)
    u = torch.rand(num, generator=g, dtype=torch.float64)
    steps = (torch.exp(u * math.log(max_gd_steps + 1)) - 1).floor()
    for k in range(int(steps.max())):
        active = (steps > k).to(theta.dtype)[:, None]
        theta = theta - 0.5 * active * gradient(theta, problem)
    return theta


def levenberg_marquardt(
    problem: Problem, theta: Tensor, *, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    """Minimize ½‖∇L‖² for a batch of starts; returns (θ, ‖∇L‖) per start.

    Gauss–Newton on the residual r = ∇L with Jacobian H (symmetric): with H = V diag(λ) Vᵀ the
    step is δ = −V diag(λ/(λ² + μ)) Vᵀ r. μ (per start, relative to mean λ²) shrinks tenfold
    after a step that lowers ‖r‖ and grows tenfold otherwise, so near a non-degenerate critical
    point of any index the iteration becomes Newton's method on ∇L = 0 and converges
    quadratically.
    """
    theta = theta.clone()
    mu = torch.full((theta.shape[0],), 1e-3, dtype=theta.dtype)
    _, r, h = grad_and_hessian(theta, problem)
    norm = r.norm(dim=1)
    for _ in range(max_iter):
        todo = (norm > tol).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        lam, vec = torch.linalg.eigh(h[todo])
        scale = (lam * lam).mean(dim=1)
        damp = mu[todo, None] * scale[:, None]
        coef = torch.einsum("spq,sp->sq", vec, r[todo]) * lam / (lam * lam + damp)
        trial = theta[todo] - torch.einsum("spq,sq->sp", vec, coef)
        _, r_t, h_t = grad_and_hessian(trial, problem)
        n_t = r_t.norm(dim=1)
        better = n_t < norm[todo]
        acc = todo[better]
        theta[acc], r[acc], h[acc], norm[acc] = trial[better], r_t[better], h_t[better], n_t[better]
        mu[todo] = torch.where(better, mu[todo] / 10, mu[todo] * 10).clamp(1e-16, 1e8)
    return theta, norm


def exact_index(problem: Problem, theta: Tensor) -> tuple[int, float]:
    """Number of negative eigenvalues of the materialized Hessian, and the smallest |λ|."""
    eig = torch.linalg.eigvalsh(grad_and_hessian(theta[None], problem)[2][0])
    return int((eig < 0).sum()), float(eig.abs().min())


def find_critical_points(
    problem: Problem,
    num_starts: int,
    *,
    seed: int,
    max_gd_steps: int = 2000,
    max_iter: int = 300,
    tol: float = 1e-9,
) -> list[CriticalPoint]:
    """Critical points from ``num_starts`` starts; duplicates are kept (they weigh the fit)."""
    g = torch.Generator().manual_seed(seed)
    theta, norm = levenberg_marquardt(
        problem, _starts(problem, num_starts, max_gd_steps, g), max_iter=max_iter, tol=tol
    )
    points = []
    for th, gn in zip(theta, norm, strict=True):
        if not gn <= tol:
            continue
        neg, min_abs = exact_index(problem, th)
        points.append(
            CriticalPoint(
                energy=float(loss(th, problem)) / problem.n,
                index=neg / problem.dim,
                num_negative=neg,
                grad_norm=float(gn),
                min_abs_eigenvalue=min_abs,
                theta=th.tolist(),
            )
        )
    return points


def fit_three_halves(points: list[CriticalPoint], alpha_max: float) -> dict | None:
    """Least squares α^{2/3} = a (ε − ε_c) on 0 < α ≤ alpha_max: α₀ = a^{3/2}, ε_c."""
    sel = [(p.energy, p.index) for p in points if 0 < p.index <= alpha_max]
    if len({a for _, a in sel}) < 2:
        return None
    eps = np.array([e for e, _ in sel])
    y = np.array([a for _, a in sel]) ** (2 / 3)
    slope, intercept = np.polyfit(eps, y, 1)
    if slope <= 0:
        return None
    resid = y - (slope * eps + intercept)
    r2 = 1 - resid.var() / y.var()
    return {"alpha0": float(slope**1.5), "eps_c": float(-intercept / slope),
            "r2_of_alpha_two_thirds": float(r2), "num_points": len(sel)}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for res, color in zip(results, colors, strict=False):
        eps = [p["energy"] for p in res["points"]]
        alpha = [p["index"] for p in res["points"]]
        ax.scatter(eps, alpha, s=10, alpha=0.5, color=color, label=f"φ = {res['phi']:.2f}")
        fit = res["fit"]
        if fit is not None:
            grid = np.linspace(fit["eps_c"], max(eps), 100)
            ax.plot(grid, fit["alpha0"] * (grid - fit["eps_c"]) ** 1.5, color=color,
                    label=f"  α₀|ε−ε_c|^1.5: ε_c = {fit['eps_c']:.3f}")
    ax.set_xlabel("energy ε = L / n")
    ax.set_ylabel("index α (fraction of negative Hessian eigenvalues)")
    ax.set_title("Critical points of n-n-n tanh networks")
    ax.legend(fontsize=7)
    phis = np.linspace(0.05, 1.0, 50)
    bx.plot(phis, 0.5 * (1 - phis) ** 2, "k--", label="½(1 − φ)² (P&B fit, tanh)")
    bx.plot(phis, 0.5 * (1 - phis), "k:", label="½(1 − φ) (linear networks)")
    for res, color in zip(results, colors, strict=False):
        minima = [p["energy"] for p in res["points"] if p["num_negative"] == 0]
        if res["fit"] is not None:
            bx.plot(res["phi"], res["fit"]["eps_c"], "o", color=color)
        if minima:
            bx.plot(res["phi"], min(minima), "x", color=color, ms=8)
    bx.plot([], [], "ko", label="fitted ε_c")
    bx.plot([], [], "kx", label="lowest minimum found")
    bx.set_xlabel("φ = parameters / data points")
    bx.set_ylabel("ε")
    bx.set_title("Critical energy against φ")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(n: int, phis: list[float], starts: int, seed: int, alpha_max: float, tol: float,
        weight_decay: float = 1e-3, max_gd_steps: int = 2000, max_iter: int = 300) -> list[dict]:
    """Critical points and the 3/2 fit for every φ (one data set per φ)."""
    results = []
    for k, phi in enumerate(phis):
        problem = make_problem(n, phi, seed + k, weight_decay)
        t0 = time.perf_counter()
        points = find_critical_points(problem, starts, seed=seed + 100 + k, tol=tol,
                                      max_gd_steps=max_gd_steps, max_iter=max_iter)
        results.append({
            "phi": problem.phi, "n": n, "m": problem.m, "parameters": problem.dim,
            "weight_decay": weight_decay, "starts": starts, "found": len(points),
            "fit": fit_three_halves(points, alpha_max),
            "seconds": time.perf_counter() - t0,
            "points": [asdict(p) for p in points],
        })
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--phis", type=float, nargs="+", default=[0.25, 0.5, 0.8])
    parser.add_argument("--starts", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--alpha-max", type=float, default=0.25)
    parser.add_argument("--tol", type=float, default=1e-9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(args.n, args.phis, args.starts, args.seed, args.alpha_max, args.tol,
                  weight_decay=args.weight_decay)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "critical_points_index.png")
    slim = [{k: v for k, v in r.items() if k != "points"} for r in results]
    for r, full in zip(slim, results, strict=True):
        pts = full["points"]
        minima = {round(p["energy"], 6) for p in pts if p["num_negative"] == 0}
        r["minima_energies"] = sorted(minima)
        r["index_range"] = [min((p["index"] for p in pts), default=None),
                            max((p["index"] for p in pts), default=None)]
        r["paper_eps_c"] = 0.5 * (1 - r["phi"]) ** 2
    payload = {"config": {**vars(args), "out": str(args.out)}, "results": results}
    (args.out / "critical_points_index.json").write_text(json.dumps(payload))
    print(json.dumps(slim, indent=1))


if __name__ == "__main__":
    main()
