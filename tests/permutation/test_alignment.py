"""Alignment, Φ and canonical forms against hand-made permutations and closed forms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_curvature.checks import ArgumentError
from lightning_curvature.permutation import (
    ChainLayer,
    apply_permutations,
    canonicalize,
    chain_spec,
    infer_chain,
    parameter_dict,
    phi,
    phi_distance,
    spec_for_module,
    weight_matching,
)

from .conftest import (
    derangement,
    fixed_mass,
    make_lenet5,
    make_mlp,
    permute_lenet5,
    permute_mlp,
)

CASES = {
    "mlp": (make_mlp, permute_mlp, (64, 32)),
    "lenet5": (make_lenet5, permute_lenet5, (6, 16, 120, 84)),
}


def permuted_perturbed(kind: str, seed: int, sigma: float):
    """(model, params A, params B = π(A + δ), perms p, δ) with δ ~ N(0, σ²·mean(A²))."""
    make, permute, widths = CASES[kind]
    model = make(seed)
    a = parameter_dict(model)
    g = torch.Generator().manual_seed(seed + 100)
    perms = [derangement(n, g) for n in widths]
    delta = {
        n: sigma * t.std() * torch.randn(t.shape, generator=g) for n, t in a.items()
    }
    b = permute({n: a[n] + delta[n] for n in a}, perms)
    return model, a, b, perms, delta


def phi_noise(a: dict) -> float:
    """Std of Φ between a network and an independent copy of it: 2·√(Σ_p m_p²/N_p) / S.

    Φ ≈ 1 − 2X/S with X = Σ A·B; for independent zero-mean entries Var X = Σ_p N_p σ_p⁴ with
    m_p = N_p σ_p² the mass of parameter p and S = Σ_p m_p.
    """
    masses = {n: float((t.double() ** 2).sum()) for n, t in a.items()}
    total = sum(masses.values())
    return 2 * math.sqrt(sum(masses[n] ** 2 / a[n].numel() for n in a)) / total


def perturbation_phi(a: dict, delta: dict) -> float:
    # Φ(A, A + δ) = Σδ² / Σ(2A + δ)², in float64, written out from Eq. 35.
    num = sum(float((d.double() ** 2).sum()) for d in delta.values())
    den = sum(float(((2 * a[n].double() + delta[n].double()) ** 2).sum()) for n in a)
    return num / den


@pytest.mark.parametrize("kind", ["mlp", "lenet5"])
def test_alignment_recovers_permutation_and_perturbation_phi(kind):
    model, a, b, perms, delta = permuted_perturbed(kind, seed=0, sigma=0.05)
    spec = spec_for_module(model)
    result = weight_matching(a, b, spec)
    # B[i] = (A+δ)[p[i]], so A's unit i is B's unit argsort(p)[i].
    for space, p in zip(spec.spaces, perms, strict=True):
        assert torch.equal(result.perms[space.name], torch.argsort(p)), space.name
    assert result.converged and result.objective >= result.initial_objective
    aligned = phi_distance(a, result.params, spec).overall
    assert aligned == pytest.approx(perturbation_phi(a, delta), rel=1e-5)  # float32 A + δ
    assert aligned < 1e-2


@pytest.mark.parametrize("kind", ["mlp", "lenet5"])
def test_naive_phi_of_permuted_copy_matches_theory(kind):
    # Theory: Φ = (S_A + S_B − 2X)/(S_A + S_B + 2X) with X = Σ A·B. Entries a permutation moves
    # meet an independent entry (zero-mean cross term, std ≈ √N·σ²), entries it leaves in place
    # contribute their mass m; with S_B ≈ S_A (1 + σ²) this gives E Φ ≈ (1 − f)/(1 + f),
    # f = 2m / (S_A (2 + σ²)), to within the cross term's fluctuation (phi_noise).
    sigma = 0.05
    model, a, b, perms, _ = permuted_perturbed(kind, seed=1, sigma=sigma)
    spec = spec_for_module(model)
    s_a = sum(float((t.double() ** 2).sum()) for t in a.values())
    m = sum(fixed_mass(a, perms, kind).values())
    f = 2 * m / (s_a * (2 + sigma**2))
    naive = phi_distance(a, b, spec).overall
    assert naive == pytest.approx((1 - f) / (1 + f), abs=4 * phi_noise(a))
    assert naive > 0.9


@pytest.mark.parametrize("kind", ["mlp", "lenet5"])
def test_independent_networks_have_phi_near_one(kind):
    make, _, _ = CASES[kind]
    a, b = parameter_dict(make(10)), parameter_dict(make(11))
    spec = spec_for_module(make(10))
    result = phi_distance(a, b, spec)
    assert result.overall == pytest.approx(1.0, abs=4 * phi_noise(a))
    for layer, names in spec.layers:
        noise = phi_noise({n: a[n] for n in names})
        assert result.layer(layer) == pytest.approx(1.0, abs=4 * noise), layer
    # Aligning two random networks lowers Φ, but they stay far apart.
    aligned = phi_distance(a, weight_matching(a, b, spec).params, spec).overall
    assert 0.5 < aligned < result.overall


def test_phi_closed_forms():
    w = torch.randn(7, 5, dtype=torch.float64)
    assert phi(w, w) == 0.0
    assert phi(w, torch.zeros_like(w)) == pytest.approx(1.0)
    assert phi(w, 3 * w) == pytest.approx(4.0 / 16.0)  # (1-3)²/(1+3)²
    with pytest.raises(ArgumentError):
        phi(w, -w)
    with pytest.raises(ArgumentError):
        phi(w, w[:3])


@pytest.mark.parametrize("kind", ["mlp", "lenet5"])
@pytest.mark.parametrize("method", ["lexicographic", "maximin"])
def test_canonical_form_keeps_outputs_and_is_permutation_invariant(kind, method, images):
    make, permute, widths = CASES[kind]
    model = make(3)
    model.eval()
    a = parameter_dict(model)
    spec = spec_for_module(model)
    g = torch.Generator().manual_seed(5)
    b = permute(a, [torch.randperm(n, generator=g) for n in widths])
    ca, cb = canonicalize(a, spec, method), canonicalize(b, spec, method)
    x, _ = images
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(functional_call(model, ca.params, (x,)), ref, atol=1e-5)
        assert torch.allclose(functional_call(model, b, (x,)), ref, atol=1e-5)
    for name in a:
        assert torch.equal(ca.params[name], cb.params[name]), name
    # The canonical order is what the method says, for the first hidden layer.
    first = spec.spaces[0]
    rows = torch.cat(
        [ca.params[ax.name].reshape(first.size, -1) for ax in first.producers], dim=1
    )
    if method == "lexicographic":
        assert torch.all(rows[1:, 0] >= rows[:-1, 0])
    else:
        spread = rows.max(0).values - rows.min(0).values
        key = rows[:, int(torch.argmax(spread))]
        assert torch.all(key[1:] >= key[:-1])


@pytest.mark.parametrize("kind", ["mlp", "lenet5"])
def test_apply_permutations_matches_hand_permutation_and_outputs(kind, images):
    make, permute, widths = CASES[kind]
    model = make(4)
    model.eval()
    a = parameter_dict(model)
    spec = spec_for_module(model)
    g = torch.Generator().manual_seed(9)
    perms = [torch.randperm(n, generator=g) for n in widths]
    ours = apply_permutations(a, spec, {s.name: p for s, p in zip(spec.spaces, perms, strict=True)})
    hand = permute(a, perms)
    for name in a:
        assert torch.equal(ours[name], hand[name]), name
    x, _ = images
    with torch.no_grad():
        assert torch.allclose(functional_call(model, ours, (x,)), model(x), atol=1e-5)


def test_single_space_matching_is_the_brute_force_optimum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    a = parameter_dict(model)
    g = torch.Generator().manual_seed(1)
    b = {n: torch.randn(t.shape, generator=g) for n, t in a.items()}
    spec = spec_for_module(model)
    result = weight_matching(a, b, spec)

    def score(p):
        return float(
            (a["0.weight"] * b["0.weight"][p]).sum()
            + (a["0.bias"] * b["0.bias"][p]).sum()
            + (a["2.weight"] * b["2.weight"][:, p]).sum()
            + (a["2.bias"] * b["2.bias"]).sum()
        )

    best = max(itertools.permutations(range(5)), key=lambda p: score(list(p)))
    assert result.perms["0"].tolist() == list(best)
    assert result.objective == pytest.approx(score(list(best)), rel=1e-6)


def test_generic_chain_and_bad_input():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    chain = infer_chain(model)
    assert [(c.prefix, c.in_block) for c in chain] == [("0", 1), ("3", 676)]
    spec = spec_for_module(model)
    assert spec.spaces[0].consumers[0].block == 676
    with pytest.raises(ArgumentError):
        infer_chain(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(ArgumentError):
        chain_spec([ChainLayer("0"), ChainLayer("3", in_block=5)], shapes)
    with pytest.raises(ArgumentError):
        chain_spec([ChainLayer("0")], shapes)
    a = parameter_dict(model)
    with pytest.raises(ArgumentError):
        apply_permutations(a, spec, {"0": torch.tensor([0, 0, 1, 2])})
    with pytest.raises(ArgumentError):
        apply_permutations(a, spec, {"nope": torch.arange(4)})
    with pytest.raises(ArgumentError):
        weight_matching(a, {"0.weight": a["0.weight"]}, spec)
    with pytest.raises(ArgumentError):
        weight_matching(a, a, spec, max_sweeps=0)
    with pytest.raises(ArgumentError):
        canonicalize(a, spec, "alphabetical")
