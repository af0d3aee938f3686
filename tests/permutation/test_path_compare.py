"""Linear-path losses and pairwise comparisons, checked with plain forward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_curvature.checks import ArgumentError
from lightning_curvature.permutation import (
    compare_networks,
    comparison_scalars,
    linear_path_loss,
    parameter_dict,
)

from .conftest import derangement, make_lenet5, make_mlp, permute_mlp, with_params

LOSS = nn.CrossEntropyLoss()


@pytest.mark.parametrize("make", [make_mlp, make_lenet5])
def test_barrier_of_a_network_with_itself_is_zero(make, images):
    model = make(0)
    a = parameter_dict(model)
    path = linear_path_loss(model, LOSS, images, a, a, num_points=5)
    assert path.barrier == 0.0
    assert len(set(path.losses)) == 1


def test_path_losses_match_forward_passes_and_leave_model_alone(images):
    model_a, model_b = make_mlp(1), make_mlp(2)
    model_a.train()
    a, b = parameter_dict(model_a), parameter_dict(model_b)
    path = linear_path_loss(model_a, LOSS, images, a, b, num_points=5)
    x, y = images
    for t, value in zip(path.t, path.losses, strict=True):
        mid = with_params(model_a, {n: (1 - t) * a[n] + t * b[n] for n in a})
        with torch.no_grad():
            assert value == pytest.approx(float(LOSS(mid.eval()(x), y)), rel=1e-5, abs=1e-6)
    chord = [(1 - t) * path.losses[0] + t * path.losses[-1] for t in path.t]
    gaps = [v - c for v, c in zip(path.losses, chord, strict=True)]
    assert path.barrier == pytest.approx(max(gaps), abs=1e-9)
    assert path.t[gaps.index(max(gaps))] == path.barrier_t
    assert path.t[0] == 0.0 and path.t[-1] == 1.0
    # The module is never written, and its train mode is restored.
    assert model_a.training
    for n, p in model_a.named_parameters():
        assert torch.equal(p.detach(), a[n])


def test_path_loss_is_batching_invariant(images):
    model = make_mlp(3)
    a, b = parameter_dict(model), parameter_dict(make_mlp(4))
    x, y = images
    whole = linear_path_loss(model, LOSS, (x, y), a, b, num_points=4)
    split = linear_path_loss(model, LOSS, [(x[:10], y[:10]), (x[10:], y[10:])], a, b, num_points=4)
    assert split.losses == pytest.approx(whole.losses, rel=1e-5)


def test_compare_networks_pairs_and_scalars(images):
    base = make_mlp(5)
    a = parameter_dict(base)
    g = torch.Generator().manual_seed(6)
    perms = [derangement(64, g), derangement(32, g)]
    delta = {n: 0.01 * t.std() * torch.randn(t.shape, generator=g) for n, t in a.items()}
    twin = with_params(base, permute_mlp({n: a[n] + delta[n] for n in a}, perms))
    other = make_mlp(7)
    before = {n: t.clone() for n, t in parameter_dict(twin).items()}
    result = compare_networks(
        {"base": base, "twin": twin, "other": other}, LOSS, images, num_points=7
    )
    assert [(p.a, p.b) for p in result.pairs] == [
        ("base", "twin"), ("base", "other"), ("twin", "other")
    ]
    for n, p in twin.named_parameters():
        assert torch.equal(p.detach(), before[n])
    pair = result.pair("base", "twin")
    assert torch.equal(pair.alignment.perms["net.1"], torch.argsort(perms[0]))
    assert pair.phi_naive.overall > 0.9 and pair.phi_aligned.overall < 1e-3
    # At initialization the naive path is no higher either (its midpoint is closer to uniform
    # outputs); the trained-network contrast is in examples/permutation_alignment.py.
    assert pair.path_aligned.barrier < 1e-3 and pair.path_naive is not None
    scalars = comparison_scalars(result)
    assert set(scalars) == {
        f"split/{kind}/{a}_{b}"
        for kind in ("phi", "phi_naive", "barrier")
        for a, b in (("base", "twin"), ("base", "other"), ("twin", "other"))
    }
    assert scalars["split/phi/base_twin"] == pair.phi_aligned.overall
    assert scalars["split/phi_naive/base_other"] == result.pair("base", "other").phi_naive.overall
    assert scalars["split/barrier/twin_other"] == result.pair("twin", "other").path_aligned.barrier
    assert comparison_scalars(result, prefix="cmp")["cmp/phi/base_twin"] == pytest.approx(
        pair.phi_aligned.overall
    )


def test_compare_networks_rejects_bad_input(images):
    m = make_mlp(0)
    with pytest.raises(ArgumentError):
        compare_networks({"only": m}, LOSS, images)
    with pytest.raises(ArgumentError):
        compare_networks({"a": m, "b": make_lenet5(0)}, LOSS, images)
    with pytest.raises(ArgumentError):
        compare_networks({"a": m, "b/c": make_mlp(1)}, LOSS, images)
    with pytest.raises(ArgumentError):
        compare_networks({"a": m, "b": make_mlp(1)}, LOSS, images, num_points=2)
    with pytest.raises(ArgumentError):
        linear_path_loss(m, LOSS, images, parameter_dict(m), parameter_dict(m), num_points=1.5)
