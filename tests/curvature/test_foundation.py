"""ParameterLayout, as_batch_set/BatchSet, module_mode, FunctionalLoss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature.curvature import (
    FunctionalLoss,
    NondeterministicModelError,
    ParameterLayout,
    as_batch_set,
    module_mode,
)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_layout_order_roundtrip_and_subsets():
    model = net()
    model[1].weight.requires_grad_(False)
    layout = ParameterLayout.from_module(model)
    assert layout.names == ("0.weight", "0.bias", "1.bias", "3.weight", "3.bias")
    assert layout.dim == 12 + 4 + 4 + 8 + 2
    flat = layout.flat_values(model)
    expected = torch.cat([p.detach().reshape(-1) for p in layout.parameters(model)])
    assert torch.equal(flat, expected)
    back = layout.unflatten(flat)
    assert all(torch.equal(back[n], dict(model.named_parameters())[n]) for n in layout.names)
    assert torch.equal(layout.flatten(back), flat)
    batched = torch.stack([flat, 2 * flat])
    assert torch.equal(layout.flatten(layout.unflatten(batched)), batched)
    assert set(layout.frozen_params(model)) == {"1.weight"}
    assert layout.slices()["1.bias"] == slice(16, 20)
    sub = ParameterLayout.from_module(model, ["3.bias", "0.bias"])
    assert sub.names == ("0.bias", "3.bias")
    assert ParameterLayout.from_module(model, [model[3].weight]).names == ("3.weight",)
    with pytest.raises(ValueError, match="unknown parameter names"):
        ParameterLayout.from_module(model, ["nope"])
    with pytest.raises(ValueError, match="expected a vector of length"):
        layout.unflatten(torch.zeros(3))


def test_batch_set_gathers_and_weights():
    x, y = torch.randn(10, 3), torch.arange(10)
    single = as_batch_set((x, y))
    assert len(single) == 1 and single.num_samples == 10 and single.weights == [1.0]
    loader = as_batch_set(DataLoader(TensorDataset(x, y), batch_size=4))
    assert loader.sizes == [4, 4, 2] and sum(loader.weights) == pytest.approx(1.0)
    merged = loader.merged()
    assert len(merged) == 1 and torch.equal(merged.batches[0][0], x)
    assert loader.merged(max_samples=5) is loader
    cast = as_batch_set((x, y), dtype=torch.float64)
    assert cast.batches[0][0].dtype == torch.float64 and cast.batches[0][1].dtype == torch.int64
    assert len(as_batch_set(DataLoader(TensorDataset(x, y), batch_size=2), max_batches=2)) == 2
    with pytest.raises(ValueError, match="empty"):
        as_batch_set([])
    with pytest.raises(ValueError, match="max_batches"):
        as_batch_set((x, y), max_batches=0)


def test_module_mode_restores_mixed_state():
    model = net().train()
    model[1].eval()
    before = [m.training for m in model.modules()]
    with module_mode(model, True):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError), module_mode(model, False):
        assert all(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def test_functional_loss_matches_module_and_leaves_buffers():
    model = net()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    loss_fn = nn.CrossEntropyLoss()
    fl = FunctionalLoss(model, loss_fn)
    theta = fl.layout.flat_values(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with module_mode(model, True):
        assert torch.allclose(fl(theta, (x, y)), loss_fn(model(x), y))
    with module_mode(model, False):
        fl(theta, (x, y))  # train-mode BatchNorm writes only into the snapshot
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    data = as_batch_set([(x[:3], y[:3]), (x[3:], y[3:])])
    with module_mode(model, True):
        assert torch.allclose(fl.mean_loss(theta, data), loss_fn(model(x), y))


def test_check_deterministic_flags_dropout_and_keeps_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    fl = FunctionalLoss(model, nn.CrossEntropyLoss())
    theta = fl.layout.flat_values(model)
    batch = (torch.randn(32, 3), torch.randint(0, 2, (32,)))
    state = torch.get_rng_state()
    with module_mode(model, False), pytest.raises(NondeterministicModelError):
        fl.check_deterministic(theta, batch)
    assert torch.equal(state, torch.get_rng_state())
    with module_mode(model, True):
        fl.check_deterministic(theta, batch)


def test_train_mode_calls_do_not_leak_into_later_eval_calls():
    model = net()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    fl = FunctionalLoss(model, nn.CrossEntropyLoss())
    theta = fl.layout.flat_values(model)
    with module_mode(model, True):
        first = fl(theta, (x, y))
    with module_mode(model, False):
        fl(theta, (x, y))
    with module_mode(model, True):
        assert torch.equal(fl(theta, (x, y)), first)
    assert set(fl.fixed_tensors()) == {n for n, _ in model.named_buffers()}
