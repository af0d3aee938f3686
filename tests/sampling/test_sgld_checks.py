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


def test_update_equals_the_formula_in_float64():
    g = torch.Generator().manual_seed(1)
    theta, grad, noise = (torch.randn(3, 11, generator=g, dtype=torch.float64) for _ in range(3))
    center = torch.randn(11, generator=g, dtype=torch.float64)  # broadcast over chains
    for eps, gamma, nbeta in ((1e-3, 100.0, 50.0), (1e-4, 0.0, 5030.0)):
        drift = nbeta * grad + gamma * (theta - center)
        expected = theta - (eps / 2) * drift + math.sqrt(eps) * noise
        got = theta.clone()
        _sgld_update(got, grad.clone(), noise, center, eps, gamma, nbeta)
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_per_tensor_record_equals_the_flat_record():
    g = torch.Generator().manual_seed(2)
    chains, shapes, steps = 3, [(4, 5), (5,), (2, 3, 2)], 5
    flat_rec = _NanGradientSteps(chains, torch.device("cpu"))
    parts_rec = _NanGradientSteps(chains, torch.device("cpu"))
    for t in range(steps):
        parts = [torch.randn(chains, *s, generator=g) for s in shapes]
        if t == 1:
            parts[2][0, 1, 2, 0] = float("nan")
        if t == 3:
            parts[1][2, 4] = -float("inf")
            parts[0][0, 0, 0] = float("inf")
        losses = torch.ones(chains)
        flat = torch.cat([p.reshape(chains, -1) for p in parts], dim=1)
        flat_rec.record(t, flat, losses)
        parts_rec.record_parts(t, parts, losses)
    assert parts_rec.steps().tolist() == flat_rec.steps().tolist() == [1, -1, 3]
