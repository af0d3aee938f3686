"""Small float64 models and a ground-truth Hessian that shares no code with the engine."""

from __future__ import annotations

import torch
from torch import nn


def flat_params(model: nn.Module) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    return names, shapes, flat


def loss_of_flat(model, loss_fn, inputs, targets):
    """theta -> loss, by hand (no ParameterLayout / FunctionalLoss)."""
    names, shapes, _ = flat_params(model)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def f(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = s.numel()
            params[n] = theta[i : i + k].view(s)
            i += k
        out = torch.func.functional_call(model, {**params, **buffers}, (inputs,))
        return loss_fn(out, targets)

    return f


def true_hessian(model, loss_fn, inputs, targets) -> torch.Tensor:
    _, _, theta = flat_params(model)
    f = loss_of_flat(model, loss_fn, inputs, targets)
    if model.training:  # torch.func cannot trace BatchNorm's in-place running-stat update
        return torch.autograd.functional.hessian(f, theta)
    return torch.func.hessian(f)(theta)


def true_ggn(model, loss_fn, inputs, targets) -> torch.Tensor:
    names, shapes, theta = flat_params(model)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def out(th):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = th[i : i + s.numel()].view(s)
            i += s.numel()
        return torch.func.functional_call(model, {**params, **buffers}, (inputs,))

    jac = torch.func.jacrev(out)(theta).reshape(-1, theta.numel())
    o = out(theta).detach()
    hl = torch.func.hessian(lambda z: loss_fn(z.view_as(o), targets))(o.reshape(-1))
    return jac.T @ hl @ jac


class MatrixOp:
    """An explicit matrix as a duck-typed operator (``dim`` and ``matvec`` only, counting calls).

    Written for the tests: it uses no engine code, so estimators run against it check the
    engine's own operator handling too.
    """

    def __init__(self, a: torch.Tensor) -> None:
        self.a, self.dim, self.calls = a, a.shape[0], 0

    def matvec(self, v):
        self.calls += 1
        return self.a @ v


def with_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigs) Qᵀ`` with a random orthogonal ``Q`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    d = eigs.numel()
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * eigs.to(torch.float64)) @ q.T


class SmallConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def _trained_bn(model: SmallConvBN, gen: torch.Generator) -> SmallConvBN:
    # Non-trivial running statistics so eval mode differs from train mode.
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1)
        model.eval()
    return model


CASES = ["tanh_mlp_ce", "relu_mlp_ce", "conv_bn_ce", "mse_regression"]


def make_case(name: str, n: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # only nn.Module init; tests run in isolation from library RNG use
    if name == "tanh_mlp_ce":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(n, 4, generator=gen)
        y = torch.randint(0, 3, (n,), generator=gen)
        loss = nn.CrossEntropyLoss()
    elif name == "relu_mlp_ce":
        model = nn.Sequential(
            nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)
        )
        x = torch.randn(n, 4, generator=gen)
        y = torch.randint(0, 3, (n,), generator=gen)
        loss = nn.CrossEntropyLoss()
    elif name == "conv_bn_ce":
        model = SmallConvBN()
        x = torch.randn(n, 1, 6, 6, generator=gen)
        y = torch.randint(0, 3, (n,), generator=gen)
        loss = nn.CrossEntropyLoss()
    elif name == "mse_regression":
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
        x = torch.randn(n, 3, generator=gen)
        y = torch.randn(n, 2, generator=gen)
        loss = nn.MSELoss()
    else:
        raise KeyError(name)
    model = model.double()
    x = x.double()
    if y.is_floating_point():
        y = y.double()
    if name == "conv_bn_ce":
        _trained_bn(model, gen)
    return model, loss, x, y
