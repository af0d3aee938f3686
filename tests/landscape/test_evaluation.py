import copy

import pytest
import torch
from torch import nn

from lightning_curvature.landscape import evaluate_points


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (30,), generator=g)
    dim = sum(p.numel() for p in model.parameters())
    basis = torch.randn(3, dim, generator=g, dtype=torch.float64)
    coefficients = torch.randn(12, 3, generator=g, dtype=torch.float64)
    return model, (x, y), basis, coefficients


def _direct(model, data, theta):
    clone = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, clone.parameters())
    with torch.no_grad():
        return nn.functional.cross_entropy(clone(data[0]), data[1]).item()


@pytest.mark.parametrize("vectorize", [None, True, False])
def test_arbitrary_points_match_direct_evaluation(vectorize):
    model, data, basis, coefficients = _setup()
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    r = evaluate_points(
        model,
        nn.CrossEntropyLoss(),
        [(data[0][:11], data[1][:11]), (data[0][11:], data[1][11:])],
        basis,
        coefficients,
        vectorize=vectorize,
        chunk_size=5,
    )
    assert r.losses.shape == (12,) and r.losses.dtype == torch.float64
    for p in range(12):
        expected = _direct(model, data, theta + coefficients[p] @ basis)
        assert r.losses[p].item() == pytest.approx(expected, rel=1e-12)
    assert r.num_forward == 24


def test_memory_budget_sets_chunk_size():
    model, data, basis, coefficients = _setup()
    tiny = evaluate_points(model, nn.CrossEntropyLoss(), data, basis, coefficients, memory_budget=1)
    assert tiny.chunk_size == 1 and not tiny.vectorized
    forced = evaluate_points(
        model, nn.CrossEntropyLoss(), data, basis, coefficients, vectorize=True
    )
    assert forced.vectorized and forced.chunk_size == 12  # everything fits in 1 GiB
    torch.testing.assert_close(forced.losses, tiny.losses, rtol=1e-12, atol=0)


def test_shape_errors():
    model, data, basis, coefficients = _setup()
    with pytest.raises(ValueError, match="length"):
        evaluate_points(model, nn.CrossEntropyLoss(), data, basis[:, :-1], coefficients)
    with pytest.raises(ValueError, match="coefficients"):
        evaluate_points(model, nn.CrossEntropyLoss(), data, basis, coefficients[:, :2])
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_points(model, nn.CrossEntropyLoss(), data, basis, coefficients, chunk_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        evaluate_points(model, nn.CrossEntropyLoss(), data, basis, coefficients, memory_budget=0)
