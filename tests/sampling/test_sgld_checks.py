"""The per-step non-finite-gradient record of the SGLD loop, against an elementwise check."""

from __future__ import annotations

import math

import torch

from lightning_curvature.sampling.sgld import _NanGradientSteps, _sgld_update


def test_first_non_finite_gradient_step_matches_an_elementwise_check():
    g = torch.Generator().manual_seed(0)
    chains, dim, steps = 5, 37, 6
    grads = torch.randn(steps, chains, dim, generator=g)
    losses = torch.ones(steps, chains)
    grads[2, 0, 3] = float("nan")
    grads[1, 1, 0] = float("inf")
    grads[4, 2, dim - 1] = -float("inf")
    grads[0, 3, 5] = float("nan")
    losses[0, 3] = float("nan")  # a non-finite loss is not "a NaN gradient at a finite loss"
    grads[3, 3, 1] = float("inf")
    rec = _NanGradientSteps(chains, torch.device("cpu"))
    for t in range(steps):
        rec.record(t, grads[t], losses[t])
    expected = []
    for c in range(chains):
        bad = [
            t
            for t in range(steps)
            if math.isfinite(float(losses[t, c]))
            and not all(math.isfinite(float(v)) for v in grads[t, c])
        ]
        expected.append(bad[0] if bad else -1)
    assert rec.steps().tolist() == expected == [2, 1, 4, 3, -1]


def test_update_with_a_work_buffer_equals_the_formula():
    g = torch.Generator().manual_seed(1)
    theta, grad, noise, center = (torch.randn(3, 11, generator=g) for _ in range(4))
    eps, gamma, nbeta = 1e-3, 100.0, 50.0
    drift = nbeta * grad + gamma * (theta - center)
    expected = theta - (eps / 2) * drift + math.sqrt(eps) * noise
    with_buffer, without = theta.clone(), theta.clone()
    _sgld_update(with_buffer, grad.clone(), noise, center, eps, gamma, nbeta, torch.empty(3, 11))
    _sgld_update(without, grad.clone(), noise, center, eps, gamma, nbeta)
    assert torch.equal(with_buffer, without)
    torch.testing.assert_close(with_buffer, expected, rtol=1e-5, atol=1e-6)
