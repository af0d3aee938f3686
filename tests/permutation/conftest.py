"""Hand-written permutations of MLP and LeNet-5 (no package code) and small data for the tests.

Convention: a permutation ``p`` of a hidden layer moves old unit ``p[i]`` to position ``i``
(``W_new = W[p]`` on the producing side, ``W_next[:, p]`` on the consuming side).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_curvature.models.networks import MLP, LeNet5

MLP_HIDDEN = (64, 32)


def derangement(n: int, g: torch.Generator) -> torch.Tensor:
    """A random permutation without fixed points (so no unit stays where it was)."""
    while True:
        p = torch.randperm(n, generator=g)
        if not torch.any(p == torch.arange(n)):
            return p


def permute_mlp(params: dict, perms: list[torch.Tensor]) -> dict:
    """MLP(784, (64, 32), 10): perms[k] reorders hidden layer k (net.1 and net.3 outputs)."""
    p1, p2 = perms
    return {
        "net.1.weight": params["net.1.weight"][p1],
        "net.1.bias": params["net.1.bias"][p1],
        "net.3.weight": params["net.3.weight"][p2][:, p1],
        "net.3.bias": params["net.3.bias"][p2],
        "net.5.weight": params["net.5.weight"][:, p2],
        "net.5.bias": params["net.5.bias"].clone(),
    }


def permute_lenet5(params: dict, perms: list[torch.Tensor]) -> dict:
    """LeNet5: perms reorder conv1 (6), conv2 (16) channels, fc1 (120), fc2 (84) units."""
    p1, p2, p3, p4 = perms
    fc1 = params["classifier.1.weight"].reshape(120, 16, 25)[p3][:, p2].reshape(120, 400)
    return {
        "features.0.weight": params["features.0.weight"][p1],
        "features.0.bias": params["features.0.bias"][p1],
        "features.3.weight": params["features.3.weight"][p2][:, p1],
        "features.3.bias": params["features.3.bias"][p2],
        "classifier.1.weight": fc1,
        "classifier.1.bias": params["classifier.1.bias"][p3],
        "classifier.3.weight": params["classifier.3.weight"][p4][:, p3],
        "classifier.3.bias": params["classifier.3.bias"][p4],
        "classifier.5.weight": params["classifier.5.weight"][:, p4],
        "classifier.5.bias": params["classifier.5.bias"].clone(),
    }


def fixed_mass(params: dict, perms: list[torch.Tensor], kind: str) -> dict[str, float]:
    """Per parameter, Σ W² over the entries the permutation maps onto themselves.

    An entry stays put when every unit axis it lies on is a fixed point; with derangements that
    is only the output layer's bias and nothing else.
    """
    out = {}
    if kind == "mlp":
        axes = {
            "net.1.weight": (0, None),
            "net.1.bias": (0, None),
            "net.3.weight": (1, 0),
            "net.3.bias": (1, None),
            "net.5.weight": (None, 1),
            "net.5.bias": (None, None),
        }
    else:
        axes = {
            "features.0.weight": (0, None),
            "features.0.bias": (0, None),
            "features.3.weight": (1, 0),
            "features.3.bias": (1, None),
            "classifier.1.weight": (2, 1),
            "classifier.1.bias": (2, None),
            "classifier.3.weight": (3, 2),
            "classifier.3.bias": (3, None),
            "classifier.5.weight": (None, 3),
            "classifier.5.bias": (None, None),
        }
    for name, (rows, cols) in axes.items():
        t = params[name].double()
        keep = torch.ones(t.shape[0], dtype=torch.bool)
        if rows is not None:
            keep = perms[rows] == torch.arange(t.shape[0])
        mass = t[keep]
        if cols is not None and t.dim() > 1:
            n_in = perms[cols].numel()
            fixed_in = perms[cols] == torch.arange(n_in)
            mass = mass.reshape(mass.shape[0], n_in, t[0].numel() // n_in)[:, fixed_in]
        out[name] = float((mass**2).sum())
    return out


def make_mlp(seed: int) -> MLP:
    torch.manual_seed(seed)  # nn.Module init only knows the global RNG; tests own their process
    return MLP(784, MLP_HIDDEN, 10, activation="tanh")


def make_lenet5(seed: int) -> LeNet5:
    torch.manual_seed(seed)
    return LeNet5(activation="tanh")


def with_params(model: nn.Module, params: dict) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.load_state_dict(params, strict=True)
    return clone


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
