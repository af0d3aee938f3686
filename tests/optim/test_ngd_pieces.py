"""The named pieces of one NGD step, each against ground truth built in the test.

Pieces: the pseudo-sample gradient matrix ``G`` (:class:`SampleGradients`: Gram, ``Gᵀc``, ``Gr``),
the span coefficients, κ (both damping modes), the SPD solve with its fallbacks, the Woodbury
remainder and the parameter update. Ground truth: per-sample gradients by a Python loop of
``torch.autograd.grad``, the true Fisher ``Jᵀ(diag p − p pᵀ)J`` with explicit Jacobians, dense
``torch.linalg.solve`` / ``eigvalsh``, and the update formulas written out.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.checks import ArgumentError
from lightning_curvature.curvature.params import ParameterLayout
from lightning_curvature.optim import NGD
from lightning_curvature.optim.sample_space import SampleGradients, lower_block_quadratic_form
from lightning_curvature.optim.solve import (
    damping_kappa,
    span_direction,
    span_direction_parts,
    spd_solver,
    true_span_coefficients,
    woodbury_remainder,
)
from lightning_curvature.optim.update import apply_update
from tests.optim.test_ngd_exact import NUM_CLASSES, dense_fisher, flat, make, ngd_step, rel_err

F64 = torch.float64


def captured_samples(name: str, fisher_type: str, batch: int = 5):
    """Run one captured forward/backward; return (model, x, y, opt, SampleGradients, grad)."""
    model, x, y = make(name, batch=batch)
    opt = NGD(model, lr=0.1, fisher_type=fisher_type)
    opt.zero_grad()
    with opt.capture():
        F.cross_entropy(model(x), y).backward()
    cap = opt._capture
    b, delta = opt._validate_capture(cap)
    samples = opt._sample_gradients(cap, b, delta, F64, x.device)
    grad = flat([p.grad for p in model.parameters()])
    return model, x, y, opt, cap, delta, samples, grad


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    return torch.stack(
        [
            flat(torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params))
            for i in range(x.shape[0])
        ]
    )


def lower_block_triangle(full: torch.Tensor, block: int) -> torch.Tensor:
    out = torch.zeros_like(full)
    n = full.shape[0]
    for i in range(0, n, block):
        out[i : i + block, : i + block] = full[i : i + block, : i + block]
    return out


# -- G and its Gram -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "conv", "norm", "sequence"])
def test_empirical_rows_are_per_sample_gradients(name):
    model, x, y, _, _, _, samples, _ = captured_samples(name, "empirical")
    reference = per_sample_grads(model, x, y)
    n = samples.num_pseudo
    g = samples.transpose_times(torch.eye(n, dtype=F64))  # row n = Gᵀ e_n
    assert rel_err(g, reference) <= 1e-10
    assert rel_err(samples.gram_lower(), lower_block_triangle(reference @ reference.T, n)) <= 1e-10


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("name", ["mlp", "conv", "norm", "sequence"])
def test_per_parameter_direction_is_the_weighted_sum_of_per_sample_gradients(name, fisher_type):
    # What the step applies, tensor by tensor: Gᵀc = Σ_n c_n g_n, against explicit rows and the
    # dense direction (F + κI)⁻¹ g written out in the test.
    model, x, y, _, _, _, samples, grad = captured_samples(name, fisher_type)
    n = samples.num_pseudo
    rows = samples.transpose_times(torch.eye(n, dtype=F64))  # (N, d), row n = g_n
    if fisher_type == "empirical":
        assert rel_err(rows, per_sample_grads(model, x, y)) <= 1e-10
    c = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=F64)
    parts = samples.transpose_times_parts(c)
    shapes = [p.shape for p in model.parameters()]
    assert [p.shape for p in parts] == shapes
    assert rel_err(flat(parts), rows.T @ c) <= 1e-10
    b, kappa = x.shape[0], 0.37
    system = rows @ rows.T + b * kappa * torch.eye(n, dtype=F64)
    solve, _ = spd_solver(system, b * kappa)
    v = torch.linalg.lstsq(rows.T, grad[:, None]).solution[:, 0]  # g = Gᵀv (in the span)
    dense = torch.linalg.solve(rows.T @ rows / b + kappa * torch.eye(rows.shape[1], dtype=F64),
                               rows.T @ v)  # fmt: skip
    assert rel_err(flat(span_direction_parts(samples, solve, v)), dense) <= 1e-8


@pytest.mark.parametrize("name", ["mlp", "conv", "norm", "sequence"])
def test_true_pseudo_samples_give_the_true_fisher(name):
    model, x, y, _, _, _, samples, _ = captured_samples(name, "true")
    b = x.shape[0]
    assert samples.reps == NUM_CLASSES - 1 and samples.num_pseudo == b * (NUM_CLASSES - 1)
    g = samples.transpose_times(torch.eye(samples.num_pseudo, dtype=F64))
    assert rel_err(g.T @ g / b, dense_fisher(model, x, y, "true")) <= 1e-10
    # The Gram (layer-factor route) agrees with the explicit rows (combine route) on the lower
    # block triangle, and the blocks above it are never written.
    assert rel_err(samples.gram_lower(), lower_block_triangle(g @ g.T, b)) <= 1e-10
    # G r for a random parameter-space vector.
    r = torch.randn(g.shape[1], generator=torch.Generator().manual_seed(2), dtype=F64)
    assert rel_err(samples.times(r), g @ r) <= 1e-10


def test_lower_block_quadratic_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=gen, dtype=F64)
    k = a @ a.T
    v = torch.randn(12, generator=gen, dtype=F64)
    for block in (1, 3, 4, 12):
        value = lower_block_quadratic_form(lower_block_triangle(k, block), v, block)
        assert value == pytest.approx(float(v @ k @ v), rel=1e-12)


# -- span coefficients ---------------------------------------------------------------------


def test_true_span_coefficients_reproduce_the_output_gradient():
    """``Σ_r v_{r,i} u_{r,i} = δ_i`` with ``u_{r,i}`` the columns of ``Mᵀ L_i`` (built here)."""
    gen = torch.Generator().manual_seed(3)
    b, c = 6, 5
    p = torch.softmax(torch.randn(b, c, generator=gen, dtype=F64), -1)
    y = F.one_hot(torch.randint(0, c, (b,), generator=gen), c).double()
    delta = (p - y) / b
    ref = p.argmax(-1)
    keep = torch.ones(b, c, dtype=torch.bool)
    keep[torch.arange(b), ref] = False
    chols, cots = [], []
    for i in range(b):
        q = p[i][keep[i]]
        chol = torch.linalg.cholesky(torch.diag(q) - torch.outer(q, q))
        u = torch.zeros(c, c - 1, dtype=F64)
        u[keep[i]] = chol
        u[ref[i]] = -chol.sum(0)
        # The columns factor diag p − p pᵀ exactly (the test's construction is right).
        assert torch.allclose(u @ u.T, torch.diag(p[i]) - torch.outer(p[i], p[i]), atol=1e-14)
        chols.append(chol)
        cots.append(u)
    v = true_span_coefficients(delta, torch.stack(chols), keep).view(c - 1, b)
    for i in range(b):
        assert torch.allclose(cots[i] @ v[:, i], delta[i], atol=1e-14)


# -- damping -------------------------------------------------------------------------------


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_per_sample_kappa_is_alpha_times_mean_nonzero_eigenvalue(fisher_type):
    model, x, y = make("mlp", batch=6)
    fisher = dense_fisher(model, x, y, fisher_type)
    evals = torch.linalg.eigvalsh(fisher)
    nonzero = evals[evals > 1e-10 * evals.max()]
    n = x.shape[0] * (1 if fisher_type == "empirical" else NUM_CLASSES - 1)
    assert nonzero.numel() == n  # generic: rank N < d
    d = fisher.shape[0]
    _, opt, _ = ngd_step(model, x, y, lr=0.1, alpha=0.7, fisher_type=fisher_type,
                         damping="per_sample")  # fmt: skip
    assert opt.stats["kappa"] == pytest.approx(0.7 * float(nonzero.mean()), rel=1e-9)
    assert opt.stats["num_pseudo_samples"] == n
    _, opt, _ = ngd_step(model, x, y, lr=0.1, alpha=0.7, fisher_type=fisher_type)
    assert opt.stats["kappa"] == pytest.approx(0.7 * float(evals.sum()) / d, rel=1e-9)


def test_damping_kappa_formulas_and_floor():
    assert damping_kappa("per_parameter", 2.0, 3.0, 1e-10, 10, 4) == pytest.approx(0.6)
    assert damping_kappa("per_sample", 2.0, 3.0, 1e-10, 10, 4) == pytest.approx(1.5)
    assert damping_kappa("per_sample", 2.0, 0.0, 0.5, 10, 4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="damping"):
        damping_kappa("other", 1.0, 1.0, 1e-10, 10, 4)


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("alpha", [1e-2, 1.0, 1e2])
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_per_sample_damping_step_matches_dense_solve(name, alpha, fisher_type):
    model, x, y = make(name)
    params = list(model.parameters())
    grad = flat(torch.autograd.grad(F.cross_entropy(model(x), y), params))
    fisher = dense_fisher(model, x, y, fisher_type)
    n = x.shape[0] * (1 if fisher_type == "empirical" else NUM_CLASSES - 1)
    kappa = alpha * float(fisher.trace()) / n
    eye = torch.eye(grad.numel(), dtype=F64)
    delta = torch.linalg.solve(fisher + kappa * eye, grad)
    moved, opt, _ = ngd_step(
        model, x, y, lr=0.5, alpha=alpha, fisher_type=fisher_type, damping="per_sample"
    )
    assert opt.stats["kappa"] == pytest.approx(kappa, rel=1e-10)
    assert rel_err(moved / 0.5, delta) <= 1e-8
    # Norm-preserving rescale: the same direction with the raw gradient's norm.
    moved, opt, _ = ngd_step(
        model, x, y, lr=0.5, alpha=alpha, fisher_type=fisher_type, damping="per_sample",
        rescale=True,
    )  # fmt: skip
    expected = delta * (grad.norm() / delta.norm())
    assert rel_err(moved / 0.5, expected) <= 1e-8
    assert opt.stats["rescale"] == pytest.approx(float(grad.norm() / delta.norm()), rel=1e-8)


# -- solve ---------------------------------------------------------------------------------


def test_spd_solver_paths():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(20, 20, generator=gen, dtype=F64)
    k = a @ a.T + 0.5 * torch.eye(20, dtype=F64)
    rhs = torch.randn(20, 3, generator=gen, dtype=F64)
    garbage = k.tril() + torch.triu(torch.full_like(k, 7.0), 1)  # only the lower triangle counts
    solve, precision = spd_solver(garbage, 0.5)
    assert precision == "float64"
    assert rel_err(solve(rhs), torch.linalg.solve(k, rhs)) <= 1e-12
    solve, precision = spd_solver(garbage.float(), 0.5)
    assert precision == "float32"
    assert solve(rhs).dtype == F64
    assert rel_err(solve(rhs), torch.linalg.solve(k, rhs)) <= 1e-3
    # Singular in float32 (rank 5, shift at float32 rounding): redone in float64.
    b = torch.randn(20, 5, generator=gen, dtype=F64)
    k = b @ b.T + 1e-9 * torch.eye(20, dtype=F64)
    solve, precision = spd_solver(k.float(), 1e-9)
    assert precision.startswith("float64")
    # An indefinite matrix (rounding made an eigenvalue negative): eigendecomposition with the
    # spectrum clamped at the shift.
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
    lam = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, -1e-3], dtype=F64)
    solve, precision = spd_solver(q @ torch.diag(lam) @ q.T, 0.1)
    assert precision == "float64-eigh"
    expected = q @ torch.diag(1 / lam.clamp_min(0.1)) @ q.T @ rhs[:6]
    assert rel_err(solve(rhs[:6]), expected) <= 1e-12


def explicit_samples(g: torch.Tensor, reps: int) -> SampleGradients:
    """``SampleGradients`` over explicit rows only (the fallback route)."""
    d = g.shape[1]
    layout = ParameterLayout.from_module(nn.Linear(d, 1, bias=False))
    return SampleGradients(
        layout=layout,
        reps=reps,
        batch=g.shape[0] // reps,
        factors=[],
        fallback=g,
        fallback_slices=[slice(0, d)],
        dtype=F64,
        device=g.device,
    )


@pytest.mark.parametrize("reps", [1, 3])
def test_span_direction_and_woodbury_remainder_against_dense(reps):
    gen = torch.Generator().manual_seed(5)
    batch, d, kappa = 4, 30, 0.03
    g = torch.randn(reps * batch, d, generator=gen, dtype=F64)
    samples = explicit_samples(g, reps)
    gram = samples.gram_lower()
    gram.diagonal().add_(batch * kappa)
    solve, _ = spd_solver(gram, batch * kappa)
    system = g.T @ g / batch + kappa * torch.eye(d, dtype=F64)
    v = torch.randn(reps * batch, generator=gen, dtype=F64)
    assert rel_err(span_direction(samples, solve, v), torch.linalg.solve(system, g.T @ v)) <= 1e-10
    r = torch.randn(d, generator=gen, dtype=F64)
    assert rel_err(woodbury_remainder(samples, solve, r, kappa), torch.linalg.solve(system, r)) <= (
        1e-10
    )


# -- update --------------------------------------------------------------------------------


def test_apply_update_momentum_and_decoupled_weight_decay():
    gen = torch.Generator().manual_seed(6)
    p = [torch.randn(3, 2, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)]
    d1 = [torch.randn_like(t) for t in p]
    d2 = [torch.randn_like(t) for t in p]
    theta0 = [t.clone() for t in p]
    states = [{}, {}]
    lr, mu, wd = 0.1, 0.9, 0.05
    n1 = apply_update(p, d1, states, lr=lr, momentum=mu, weight_decay=wd)
    theta1 = [t0 * (1 - lr * wd) - lr * d for t0, d in zip(theta0, d1, strict=True)]
    assert all(torch.allclose(a, b, atol=1e-15) for a, b in zip(p, theta1, strict=True))
    assert n1 == pytest.approx(float(flat(theta1).sub(flat(theta0)).norm()), rel=1e-12)
    apply_update(p, d2, states, lr=lr, momentum=mu, weight_decay=wd)
    m2 = [mu * a + b for a, b in zip(d1, d2, strict=True)]
    theta2 = [t1 * (1 - lr * wd) - lr * m for t1, m in zip(theta1, m2, strict=True)]
    assert all(torch.allclose(a, b, atol=1e-15) for a, b in zip(p, theta2, strict=True))
    # The buffers are the optimizer's state and are not aliases of the directions.
    assert torch.allclose(states[0]["momentum_buffer"], m2[0]) and d1[0] is not m2[0]


# -- stats and arguments -------------------------------------------------------------------


def test_skipped_and_normal_steps_report_the_same_keys():
    model, x, y = make("mlp")
    _, opt, _ = ngd_step(model, x, y, lr=0.1)
    normal = set(opt.stats)
    model2 = copy.deepcopy(model)
    opt2 = NGD(model2, lr=0.1)

    def bad():
        opt2.zero_grad()
        loss = F.cross_entropy(model2(x), y) * float("nan")
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="step skipped"):
        opt2.step(bad)
    assert opt2.stats["skipped"] is True and math.isnan(opt2.stats["kappa"])
    assert set(opt2.stats) == normal


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"damping": "trace"}, "damping"),
        ({"rescale": 1}, "rescale"),
        ({"lr": "0.1"}, "lr"),
        ({"momentum": True}, "momentum"),
        ({"fisher_type": "mc"}, "fisher_type"),
    ],
)
def test_arguments_are_checked_with_one_message_form(kwargs, name):
    model, _, _ = make("mlp")
    with pytest.raises(ArgumentError, match=f"`{name}` must be"):
        NGD(model, **{"lr": 0.1, **kwargs})
