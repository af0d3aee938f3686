"""The linear-stem rewrite: first layer once per direction, same losses as the direct forward.

Ground truth is a deep copy of the model with its parameters overwritten
(``vector_to_parameters``) and an ordinary forward pass: it shares no code with the rewrite.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_curvature.landscape import evaluate_points, loss_surface, random_directions


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3)).double()


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3),
    ).double()  # fmt: skip


def _data(shape, n=26, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _setup(build, seed=0):
    torch.manual_seed(seed)
    model = build()
    conv = isinstance(model[0], nn.Conv2d)
    x, y = _data((1, 4, 4) if conv else (1, 4, 3))  # 4x4 images, or 12 features to flatten
    if conv:
        model.train()
        with torch.no_grad():
            model(x)  # BatchNorm running statistics that are not the defaults
        model.eval()
    return model, x, y


def _direct(model, x, y, theta, names=None):
    clone = copy.deepcopy(model)
    if names is None:
        torch.nn.utils.vector_to_parameters(theta, clone.parameters())
    else:
        lookup = dict(clone.named_parameters())
        torch.nn.utils.vector_to_parameters(theta, [lookup[n] for n in names])
    clone.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(clone(x), y).item()


@pytest.mark.parametrize("build", [_mlp, _cnn])
@pytest.mark.parametrize("vectorize", [True, False])
def test_stem_matches_the_direct_forward_on_every_point(build, vectorize):
    model, x, y = _setup(build)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(3, theta.numel(), generator=g, dtype=torch.float64)
    coef = torch.randn(7, 3, generator=g, dtype=torch.float64)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    r = evaluate_points(
        model, nn.CrossEntropyLoss(), batches, basis, coef, vectorize=vectorize, chunk_size=3,
        linear_stem=True,
    )  # fmt: skip
    assert r.linear_stem and r.vectorized == vectorize
    off = evaluate_points(
        model, nn.CrossEntropyLoss(), batches, basis, coef, vectorize=vectorize, linear_stem=False
    )
    assert not off.linear_stem
    for p in range(7):
        expected = _direct(model, x, y, theta + coef[p] @ basis)
        assert r.losses[p].item() == pytest.approx(expected, rel=1e-12)
        assert off.losses[p].item() == pytest.approx(expected, rel=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("names", [["3.weight", "3.bias"], ["1.weight"], ["1.bias", "3.weight"]])
def test_stem_with_a_parameter_subset(names):
    model, x, y = _setup(_mlp)
    lookup = dict(model.named_parameters())
    theta = torch.cat([lookup[n].detach().reshape(-1) for n in names])
    g = torch.Generator().manual_seed(2)
    basis = torch.randn(2, theta.numel(), generator=g, dtype=torch.float64)
    coef = torch.randn(5, 2, generator=g, dtype=torch.float64)
    r = evaluate_points(
        model, nn.CrossEntropyLoss(), (x, y), basis, coef, params=names, linear_stem=True
    )
    assert r.linear_stem
    for p in range(5):
        expected = _direct(model, x, y, theta + coef[p] @ basis, names)
        assert r.losses[p].item() == pytest.approx(expected, rel=1e-12)


class _CountLinearOnData(TorchFunctionMode):
    """Counts F.linear calls whose input is the (flattened) data itself."""

    def __init__(self, rows: int, features: int) -> None:
        super().__init__()
        self.shape, self.calls = (rows, features), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is nn.functional.linear and tuple(args[0].shape[-2:]) == self.shape:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_first_layer_runs_once_per_direction_not_once_per_point():
    model, x, y = _setup(_mlp)
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    counter = _CountLinearOnData(x.shape[0], 12)
    with counter:
        s = loss_surface(
            model, nn.CrossEntropyLoss(), (x, y), dirs, steps=9, chunk_size=1000, linear_stem=True
        )
    # Probe forwards for the memory bound (2) + Z_0, Z_1, Z_2 (3); not 81.
    assert s.losses.shape == (9, 9) and counter.calls <= 6
    counter_off = _CountLinearOnData(x.shape[0], 12)
    with counter_off:
        loss_surface(
            model, nn.CrossEntropyLoss(), (x, y), dirs, steps=9, chunk_size=1000,
            linear_stem=False,
        )  # fmt: skip
    assert counter_off.calls >= 81


def test_default_uses_the_rewrite_only_where_the_first_layer_is_wide():
    # fan-in 100 >= 32·(K + 1) = 96 for two directions; 12 < 96.
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (20,), generator=g)
    for fan_in, expected in ((100, True), (12, False)):
        model = nn.Sequential(nn.Linear(fan_in, 5), nn.ReLU(), nn.Linear(5, 3)).double()
        x = torch.randn(20, fan_in, generator=g, dtype=torch.float64)
        dirs = random_directions(model, 2, generator=g)
        s = loss_surface(model, nn.CrossEntropyLoss(), (x, y), dirs, steps=3)
        r = evaluate_points(
            model, nn.CrossEntropyLoss(), (x, y), torch.stack(dirs), torch.zeros(1, 2)
        )
        assert r.linear_stem is expected
        theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        assert s.losses[0, 2] == pytest.approx(
            _direct(model, x, y, theta - dirs[0] + dirs[1]), rel=1e-12
        )


def test_points_on_single_directions_combine_only_their_nonzero_terms():
    # Five directions, one nonzero coordinate per point (as in the projection trace): two terms
    # per point, so fan-in 100 >= 32·2 qualifies although 100 < 32·(5 + 1).
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(100, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(30, 100, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    basis = torch.randn(5, theta.numel(), generator=g, dtype=torch.float64)
    coef = torch.zeros(11, 5, dtype=torch.float64)
    for j in range(5):
        coef[2 * j, j], coef[2 * j + 1, j] = 0.3, -0.7
    r = evaluate_points(model, nn.CrossEntropyLoss(), (x, y), basis, coef)
    assert r.linear_stem
    for p in range(11):
        expected = _direct(model, x, y, theta + coef[p] @ basis)
        assert r.losses[p].item() == pytest.approx(expected, rel=1e-12)
    assert r.losses[10].item() == _direct(model, x, y, theta)  # w* itself: bitwise


def test_models_the_rewrite_does_not_cover_fall_back_or_refuse():
    model, x, y = _setup(_mlp)
    dim = sum(p.numel() for p in model.parameters())
    basis = torch.randn(1, dim, dtype=torch.float64)
    coef = torch.randn(3, 1, dtype=torch.float64)
    assert evaluate_points(
        model, nn.CrossEntropyLoss(), (x, y), basis, coef, linear_stem=True
    ).linear_stem
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(1))
    try:
        r = evaluate_points(model, nn.CrossEntropyLoss(), (x, y), basis, coef)
        assert not r.linear_stem and len(seen) > 3  # a hook sees every forward: no rewrite
        with pytest.raises(ValueError, match="linear_stem"):
            evaluate_points(model, nn.CrossEntropyLoss(), (x, y), basis, coef, linear_stem=True)
    finally:
        handle.remove()
    tied = nn.Sequential(nn.Flatten(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12)).double()
    tied[3].weight = tied[1].weight
    dim = sum(p.numel() for p in tied.parameters())
    r = evaluate_points(
        tied, nn.CrossEntropyLoss(), (x, y), torch.randn(1, dim, dtype=torch.float64), coef
    )
    assert not r.linear_stem
    # The K + 1 first-layer outputs must fit the memory budget, else the generic path.
    wide = nn.Sequential(nn.Linear(100, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    xw = torch.randn(x.shape[0], 100, dtype=torch.float64)
    wide_basis = torch.randn(1, sum(p.numel() for p in wide.parameters()), dtype=torch.float64)
    fits = evaluate_points(wide, nn.CrossEntropyLoss(), (xw, y), wide_basis, coef)
    small = evaluate_points(
        wide, nn.CrossEntropyLoss(), (xw, y), wide_basis, coef, memory_budget=64
    )
    assert fits.linear_stem and not small.linear_stem
    torch.testing.assert_close(fits.losses, small.losses, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="linear_stem"):
        evaluate_points(model, nn.CrossEntropyLoss(), (x, y), basis, coef, linear_stem="yes")


class _Wrapper(nn.Module):
    """A declared pass-through (as MLP and ImageClassifier declare theirs)."""

    forward_module = "inner"

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.inner(x)


class _Overriding(_Wrapper):
    """Inherits the declaration but changes forward: must not take the rewrite."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        return 2.0 * self.inner(x)


def test_declared_pass_through_modules_reach_the_rewrite():
    from lightning_curvature.models import MLP, ImageClassifier

    torch.manual_seed(5)
    classifier = ImageClassifier(MLP(12, (9,), 3), optimizer="sgd", lr=0.1).double()
    x, y = _data((1, 4, 3))
    theta = torch.nn.utils.parameters_to_vector(classifier.parameters()).detach()
    g = torch.Generator().manual_seed(6)
    basis = torch.randn(2, theta.numel(), generator=g, dtype=torch.float64)
    coef = torch.randn(6, 2, generator=g, dtype=torch.float64)
    r = evaluate_points(classifier, nn.CrossEntropyLoss(), (x, y), basis, coef, linear_stem=True)
    assert r.linear_stem
    for p in range(6):
        expected = _direct(classifier, x, y, theta + coef[p] @ basis)
        assert r.losses[p].item() == pytest.approx(expected, rel=1e-12)
    # A subclass that overrides forward, and a wrapper with a parameter of its own, do not.
    overriding = _Overriding(_mlp())
    with pytest.raises(ValueError):
        evaluate_points(overriding, nn.CrossEntropyLoss(), (x, y), basis[:, :147], coef,
                        linear_stem=True)  # fmt: skip
    owning = _Wrapper(_mlp())
    owning.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
    dim = sum(p.numel() for p in owning.parameters())
    basis_o = torch.randn(2, dim, generator=g, dtype=torch.float64)
    off = evaluate_points(owning, nn.CrossEntropyLoss(), (x, y), basis_o, coef)
    assert not off.linear_stem
    plain = evaluate_points(_Wrapper(_mlp()), nn.CrossEntropyLoss(), (x, y), basis[:, :147], coef)
    assert plain.linear_stem is False  # fan-in 12 < 32·3: the default rule still applies
