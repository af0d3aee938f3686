"""Small models, data and a duck-typed diagonal operator shared by the landscape tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class DiagonalOperator:
    """H = diag(h) exposing only the duck-typed operator interface (no engine code)."""

    def __init__(self, diagonal: torch.Tensor, with_matmat: bool = True) -> None:
        self.h = diagonal
        self.dim = diagonal.numel()
        self.dtype = diagonal.dtype
        self.device = diagonal.device
        self.num_matvecs = 0
        if with_matmat:
            self.matmat = self._matmat

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        return self.h * v

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += V.shape[1]
        return self.h[:, None] * V


class DenseOperator:
    """A materialized symmetric matrix as a duck-typed operator."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


class SmallConvNet(nn.Module):
    """Conv + BatchNorm + dropout + Linear: exercises filters, 1-D params, buffers and modes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(h.flatten(1)))


@pytest.fixture
def conv_setup():
    """A float64 conv net (with non-trivial BN statistics) in train mode and 3 unequal batches."""
    torch.manual_seed(0)
    model = SmallConvNet().double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(3, generator=g, dtype=torch.float64) * 0.1)
        model.bn.running_var.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        model.bn.weight.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
    model.train()
    x = torch.randn(23, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (23,), generator=g)
    batches = [(x[:10], y[:10]), (x[10:17], y[10:17]), (x[17:], y[17:])]
    return model, nn.CrossEntropyLoss(), batches, (x, y)


def function_data(num: int = 50, seed: int = 0):
    """f(x) = log(sin 10x + 2) + sin x on [-1, 1) (Böttcher & Wheeler, App. D)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num, 1, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.log(torch.sin(10 * x) + 2) + torch.sin(x)


def trained_tanh_net(
    seed: int, steps: int, width: int = 16, polish: int = 0
) -> tuple[nn.Module, tuple]:
    """A 1-16-16-1 tanh net fitted with Adam (float64) to the function above.

    ``polish`` > 0 adds that many L-BFGS iterations, to get close to a critical point.
    """
    x, y = function_data()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.MSELoss()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    if polish:
        lbfgs = torch.optim.LBFGS(
            model.parameters(),
            max_iter=polish,
            tolerance_grad=1e-12,
            tolerance_change=0,
            line_search_fn="strong_wolfe",
        )

        def closure():
            lbfgs.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        lbfgs.step(closure)
    for p in model.parameters():
        p.grad = None
    return model, (x, y)


def flat_hessian(model: nn.Module, loss_fn, data) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta, dense Hessian) of the mean loss via torch.func.hessian (ground truth)."""
    from torch.func import functional_call, hessian

    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x, y = data

    def loss(t: torch.Tensor) -> torch.Tensor:
        tensors, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = s.numel()
            tensors[n] = t[offset : offset + k].reshape(s)
            offset += k
        return loss_fn(functional_call(model, tensors, (x,)), y)

    return theta, hessian(loss)(theta)


@pytest.fixture(scope="session")
def helpers():
    """The helpers above (importlib mode cannot import conftest as a module)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        DiagonalOperator=DiagonalOperator,
        DenseOperator=DenseOperator,
        SmallConvNet=SmallConvNet,
        function_data=function_data,
        trained_tanh_net=trained_tanh_net,
        flat_hessian=flat_hessian,
    )
