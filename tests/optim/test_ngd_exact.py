"""NGD's update against dense float64 linear algebra built independently of the implementation.

Ground truth: per-sample gradients by a Python loop of ``torch.autograd.grad`` (empirical Fisher),
``Jᵀ(diag p − p pᵀ)J`` with explicit logit Jacobians (true Fisher), and ``torch.linalg.solve`` of
the d×d system ``(F + κI) Δ = g``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.optim import NGD

NUM_CLASSES = 3


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES)
    )


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, NUM_CLASSES),
    )


def norm_net() -> nn.Module:
    """LayerNorm and a bias-free layer: exercises the torch.func fallback next to factors."""
    return nn.Sequential(
        nn.Linear(4, 6, bias=False), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, NUM_CLASSES)
    )


class SequenceNet(nn.Module):
    """A Linear applied at T=3 positions per sample (factor route with position pairs)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.head = nn.Linear(5, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)).mean(1))


MODELS = {
    "mlp": (mlp, (4,)),
    "conv": (conv_net, (2, 6, 6)),
    "norm": (norm_net, (4,)),
    "sequence": (SequenceNet, (3, 5)),
}


def make(name: str, batch: int = 7, seed: int = 0):
    builder, shape = MODELS[name]
    torch.manual_seed(seed)
    model = builder().double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return model, x, y


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def dense_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher_type: str):
    params = list(model.parameters())
    b = x.shape[0]
    if fisher_type == "empirical":
        rows = [
            flat(torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params))
            for i in range(b)
        ]
        g = torch.stack(rows)
        return g.T @ g / b
    d = sum(p.numel() for p in params)
    fisher = torch.zeros(d, d, dtype=torch.float64)
    for i in range(b):
        logits = model(x[i : i + 1])[0]
        jac = torch.stack(
            [
                flat(torch.autograd.grad(logits[c], params, retain_graph=True))
                for c in range(logits.numel())
            ]
        )
        p = logits.detach().softmax(-1)
        fisher += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return fisher / b


def dense_step(model, x, y, fisher_type, alpha, eps=1e-10):
    params = list(model.parameters())
    grad = flat(torch.autograd.grad(F.cross_entropy(model(x), y), params))
    fisher = dense_fisher(model, x, y, fisher_type)
    d = grad.numel()
    kappa = alpha * max(float(fisher.trace()), eps) / d
    delta = torch.linalg.solve(fisher + kappa * torch.eye(d, dtype=torch.float64), grad)
    return delta, kappa, float(fisher.trace()), grad


def ngd_step(model, x, y, **kwargs):
    """Apply one NGD step to a copy; return (θ0 − θ1, optimizer, stepped model)."""
    model = copy.deepcopy(model)
    opt = NGD(model, **kwargs)
    before = flat([p.detach().clone() for p in model.parameters()])

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    after = flat([p.detach() for p in model.parameters()])
    return before - after, opt, model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("alpha", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_one_step_matches_dense_solve(name, alpha, fisher_type):
    model, x, y = make(name)
    delta, kappa, trace, _ = dense_step(model, x, y, fisher_type, alpha)
    lr = 0.3
    moved, opt, _ = ngd_step(model, x, y, lr=lr, alpha=alpha, fisher_type=fisher_type)
    assert rel_err(moved / lr, delta) <= 1e-8
    assert opt.stats["kappa"] == pytest.approx(kappa, rel=1e-10)
    assert opt.stats["fisher_trace"] == pytest.approx(trace, rel=1e-10)
    assert opt.stats["update_norm"] == pytest.approx(float(moved.norm()), rel=1e-10)
    assert opt.stats["skipped"] is False


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("name", ["norm", "sequence", "conv"])
def test_factor_and_vmap_paths_agree_with_dense(name, fisher_type):
    model, x, y = make(name)
    delta, _, _, _ = dense_step(model, x, y, fisher_type, alpha=0.1)
    results = {}
    for backend in ("factors", "vmap"):
        moved, opt, _ = ngd_step(
            model, x, y, lr=1.0, alpha=0.1, fisher_type=fisher_type, backend=backend
        )
        results[backend] = moved
        assert rel_err(moved, delta) <= 1e-8, backend
    assert rel_err(results["factors"], results["vmap"]) <= 1e-9


def test_factor_routes_are_used():
    """The conv and sequence models must exercise both T > 1 routes (not only the fallback)."""
    model, _, _ = make("sequence")
    opt = NGD(model, lr=0.1)
    assert opt._fallback is None and len(opt._layers) == 2
    model, _, _ = make("conv")
    assert NGD(model, lr=0.1)._fallback is None
    model, _, _ = make("norm")
    opt = NGD(model, lr=0.1)
    assert set(opt._fallback.names) == {"1.weight", "1.bias"}


def test_weight_decay_is_decoupled():
    model, x, y = make("mlp")
    delta, _, _, _ = dense_step(model, x, y, "empirical", alpha=1.0)
    theta = flat([p.detach() for p in model.parameters()])
    lr, wd = 0.2, 0.05
    moved, opt, _ = ngd_step(model, x, y, lr=lr, alpha=1.0, weight_decay=wd)
    assert rel_err(moved, lr * (delta + wd * theta)) <= 1e-8
    assert opt.stats["update_norm"] == pytest.approx(float(moved.norm()), rel=1e-10)


def test_momentum_accumulates_directions():
    model, x, y = make("mlp")
    model = copy.deepcopy(model)
    lr, mu = 0.1, 0.9
    opt = NGD(model, lr=lr, alpha=1.0, momentum=mu)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    d1, _, _, _ = dense_step(model, x, y, "empirical", 1.0)
    opt.step(closure)
    theta1 = flat([p.detach().clone() for p in model.parameters()])
    d2, _, _, _ = dense_step(model, x, y, "empirical", 1.0)
    opt.step(closure)
    theta2 = flat([p.detach() for p in model.parameters()])
    assert rel_err((theta1 - theta2) / lr, mu * d1 + d2) <= 1e-8


def test_large_kappa_reduces_to_sgd_with_lr_over_kappa():
    model, x, y = make("conv")
    _, kappa, _, grad = dense_step(model, x, y, "empirical", alpha=1e12)
    assert kappa > 1e9
    # lr = κ keeps the parameter change O(1), so its float64 difference is not rounding noise.
    moved, opt, _ = ngd_step(model, x, y, lr=kappa, alpha=1e12)
    assert opt.stats["kappa"] == pytest.approx(kappa, rel=1e-12)
    assert rel_err(moved, grad) <= 1e-8
    # ... whereas with α = 1 the step is far from the gradient direction.
    moved, opt, _ = ngd_step(model, x, y, lr=1.0, alpha=1.0)
    assert rel_err(moved * opt.stats["kappa"], grad) > 0.1


def test_kappa_formula_and_eps_floor():
    model, x, y = make("mlp")
    d = sum(p.numel() for p in model.parameters())
    _, _, trace, _ = dense_step(model, x, y, "empirical", alpha=1.0)
    _, opt, _ = ngd_step(model, x, y, lr=0.1, alpha=0.37)
    assert opt.stats["kappa"] == pytest.approx(0.37 * trace / d, rel=1e-12)
    big_eps = 1e3 * trace
    delta, kappa, _, _ = dense_step(model, x, y, "empirical", alpha=0.37, eps=big_eps)
    moved, opt, _ = ngd_step(model, x, y, lr=1.0, alpha=0.37, eps=big_eps)
    assert opt.stats["kappa"] == pytest.approx(0.37 * big_eps / d, rel=1e-12)
    assert kappa == pytest.approx(0.37 * big_eps / d, rel=1e-12)
    assert rel_err(moved, delta) <= 1e-8


def test_extra_loss_term_is_solved_exactly_with_a_warning():
    """An L2 term in the loss is outside the per-sample gradients: solved by Woodbury."""
    model, x, y = make("mlp")
    lam = 1e-2
    params = list(model.parameters())
    fisher = dense_fisher(model, x, y, "empirical")
    loss = F.cross_entropy(model(x), y) + lam * sum(p.square().sum() for p in params)
    grad = flat(torch.autograd.grad(loss, params))
    d = grad.numel()
    kappa = 10.0 * float(fisher.trace()) / d
    delta = torch.linalg.solve(fisher + kappa * torch.eye(d, dtype=torch.float64), grad)

    model2 = copy.deepcopy(model)
    opt = NGD(model2, lr=1.0, alpha=10.0)
    before = flat([p.detach().clone() for p in model2.parameters()])

    def closure():
        opt.zero_grad()
        total = F.cross_entropy(model2(x), y) + lam * sum(
            p.square().sum() for p in model2.parameters()
        )
        total.backward()
        return total

    with pytest.warns(UserWarning, match="differs from the mean"):
        opt.step(closure)
    moved = before - flat([p.detach() for p in model2.parameters()])
    assert rel_err(moved, delta) <= 1e-8
    assert opt.stats["grad_residual"] > 1e-3


def test_step_without_closure_inside_capture():
    model, x, y = make("conv")
    ref, _, _ = ngd_step(model, x, y, lr=0.1, alpha=1.0, fisher_type="true")
    model2 = copy.deepcopy(model)
    opt = NGD(model2, lr=0.1, alpha=1.0, fisher_type="true")
    before = flat([p.detach().clone() for p in model2.parameters()])
    opt.zero_grad()
    with opt.capture():
        F.cross_entropy(model2(x), y).backward()
    opt.step()
    moved = before - flat([p.detach() for p in model2.parameters()])
    assert rel_err(moved, ref) <= 1e-12
    with pytest.raises(RuntimeError, match="capture"):
        opt.step()


def test_true_fisher_matches_sampled_labels():
    """tr F and the NGD step with the exact true Fisher vs many sampled labels per input."""
    model, x, y = make("mlp", batch=5, seed=3)
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    b = x.shape[0]
    gen = torch.Generator().manual_seed(0)
    num_draws = 200_000
    # Per-class gradients g_{i,c} = ∇CE(x_i, c); draws enter only through the label counts.
    fisher_mc = torch.zeros(d, d, dtype=torch.float64)
    trace_mc = 0.0
    for i in range(b):
        logits = model(x[i : i + 1])
        probs = logits.detach().softmax(-1)[0]
        counts = torch.bincount(
            torch.multinomial(probs, num_draws, replacement=True, generator=gen),
            minlength=NUM_CLASSES,
        ).double()
        for c in range(NUM_CLASSES):
            g = flat(
                torch.autograd.grad(
                    F.cross_entropy(logits, torch.tensor([c])), params, retain_graph=True
                )
            )
            fisher_mc += counts[c] / num_draws * torch.outer(g, g)
            trace_mc += float(counts[c] / num_draws * g.dot(g))
    fisher_mc /= b
    trace_mc /= b
    grad = flat(torch.autograd.grad(F.cross_entropy(model(x), y), params))

    moved, opt, _ = ngd_step(model, x, y, lr=1.0, alpha=1.0, fisher_type="true")
    assert opt.stats["fisher_trace"] == pytest.approx(trace_mc, rel=1e-2)
    kappa = opt.stats["kappa"]
    delta_mc = torch.linalg.solve(fisher_mc + kappa * torch.eye(d, dtype=torch.float64), grad)
    assert rel_err(moved, delta_mc) <= 2e-2
    # ... and an empirical-Fisher step is measurably different (the test can fail).
    moved_emp, _, _ = ngd_step(model, x, y, lr=1.0, alpha=1.0, fisher_type="empirical")
    assert rel_err(moved_emp, delta_mc) > 0.1


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_float32_step_matches_dense_float64_solve(fisher_type):
    """The float32 path (float32 Gram and Cholesky) is accurate to float32 conditioning."""
    model64, x64, y = make("conv", batch=16)
    delta, _, _, _ = dense_step(model64, x64, y, fisher_type, alpha=1.0)
    model32 = copy.deepcopy(model64).float()
    moved, opt, _ = ngd_step(model32, x64.float(), y, lr=1.0, alpha=1.0, fisher_type=fisher_type)
    assert opt.stats["solve_precision"] == "float32"
    assert rel_err(moved.double(), delta) <= 1e-3


def test_float32_breakdown_falls_back_to_float64():
    """K is singular (N = 2·64 pseudo-samples > d = 83) and κ ≈ 0: float32 Cholesky breaks
    down and the step is redone in float64."""
    model64, x64, y = make("mlp", batch=64)
    model32 = copy.deepcopy(model64).float()
    moved, opt, _ = ngd_step(model32, x64.float(), y, lr=1e-3, alpha=1e-12, fisher_type="true")
    assert opt.stats["solve_precision"].startswith("float64")
    assert torch.isfinite(moved).all()
