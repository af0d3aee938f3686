"""NGD in training loops: loss goes down, stays finite, Lightning, state, errors and guards."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.optim import NGD


def blobs(n: int = 256, dim: int = 8, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


def classifier(dim: int = 8, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, classes)
    )


def small_lenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def train(model, opt, x, y, steps: int, batch: int = 32, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb, yb = x[idx], y[idx]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


def full_loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


# The empirical Fisher is the less stable preconditioner (its steps grow as the per-sample
# gradients shrink), so it gets the gentler setting.
SETTINGS = {
    "empirical": {"lr": 0.05, "alpha": 1.0, "momentum": 0.0},
    "true": {"lr": 0.05, "alpha": 0.1, "momentum": 0.5},
}


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_ngd_lowers_the_loss(fisher_type):
    x, y = blobs()
    model = classifier()
    opt = NGD(model, fisher_type=fisher_type, **SETTINGS[fisher_type])
    before = full_loss(model, x, y)
    train(model, opt, x, y, steps=40)
    after = full_loss(model, x, y)
    assert after < 0.3 * before
    assert not opt.stats["skipped"]


@pytest.mark.parametrize(("fisher_type", "lr"), [("empirical", 0.3), ("true", 0.1)])
def test_per_sample_damping_lowers_the_loss_at_the_documented_setting(fisher_type, lr):
    """docs/ngd.md's working setting: α = 1 relative to the mean nonzero eigenvalue."""
    x, y = blobs()
    model = classifier()
    opt = NGD(model, lr=lr, alpha=1.0, fisher_type=fisher_type, damping="per_sample")
    before = full_loss(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, x, y, steps=40)
    assert full_loss(model, x, y) < 0.3 * before
    assert opt.stats["kappa"] == pytest.approx(
        opt.stats["fisher_trace"] / opt.stats["num_pseudo_samples"], rel=1e-12
    )


def test_true_fisher_training_stays_finite_with_tiny_damping():
    """B ≪ d and α small: κ is tiny, so any out-of-span gradient part would explode."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 1, 10, 10, generator=g)
    y = (x[:, 0, :5].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 5:].mean((1, 2)) > 0).long()
    model = small_lenet()
    d = sum(p.numel() for p in model.parameters())
    assert d > 32 * 4 * 5  # many more parameters than pseudo-samples per step
    opt = NGD(model, lr=0.02, alpha=1e-4, fisher_type="true")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skipped step, no residual warning
        losses = train(model, opt, x, y, steps=40)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(p.abs().max() for p in model.parameters()) < 100
    assert losses[-1] < losses[0]
    assert opt.stats["kappa"] > 0 and math.isfinite(opt.stats["fisher_trace"])


def test_nonfinite_gradient_skips_the_step():
    x, y = blobs(64)
    model = classifier()
    opt = NGD(model, lr=0.1, momentum=0.9)
    train(model, opt, x, y, steps=2)
    weights = copy.deepcopy(model.state_dict())
    buffers = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}

    def bad_closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x[:16]), y[:16]) * float("nan")
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="step skipped"):
        opt.step(bad_closure)
    assert opt.stats["skipped"] is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], buffers[k])
    # Training continues normally afterwards.
    train(model, opt, x, y, steps=1)
    assert opt.stats["skipped"] is False


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_nonfinite_input_does_not_corrupt_weights(fisher_type):
    # Non-finite logits must skip the step, not raise (the true Fisher factorizes softmax
    # probabilities inside the forward hook, where a NaN once raised a Cholesky error).
    x, y = blobs(64)
    model = classifier()
    opt = NGD(model, lr=0.1, fisher_type=fisher_type)
    weights = copy.deepcopy(model.state_dict())
    xb = x[:16].clone()
    xb[3, 2] = float("inf")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), y[:16])
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="step skipped"):
        opt.step(closure)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])


def test_state_dict_round_trip():
    x, y = blobs(128)
    model_a = classifier()
    opt_a = NGD(model_a, lr=0.05, alpha=0.5, momentum=0.9, weight_decay=1e-3)
    train(model_a, opt_a, x, y, steps=3)
    state = copy.deepcopy(opt_a.state_dict())
    assert all("momentum_buffer" in s for s in state["state"].values())

    model_b = copy.deepcopy(model_a)
    opt_b = NGD(model_b, lr=1.0, alpha=7.0, momentum=0.1)  # overwritten by the load
    opt_b.load_state_dict(state)
    assert opt_b.param_groups[0]["lr"] == 0.05 and opt_b.param_groups[0]["alpha"] == 0.5
    train(model_a, opt_a, x, y, steps=2, seed=5)
    train(model_b, opt_b, x, y, steps=2, seed=5)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # Without the momentum buffers the trajectories differ (the test can fail).
    model_c = copy.deepcopy(model_b)
    opt_c = NGD(model_c, lr=0.05, alpha=0.5, momentum=0.9, weight_decay=1e-3)
    train(model_b, opt_b, x, y, steps=1, seed=6)
    train(model_c, opt_c, x, y, steps=1, seed=6)
    assert not all(
        torch.equal(pb, pc)
        for pb, pc in zip(model_b.parameters(), model_c.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"eps": 0.0}, "eps"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"fisher_type": "mc"}, "fisher_type"),
        ({"backend": "dense"}, "backend"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, name):
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=name):
        NGD(classifier(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(ValueError, match="model"):
        NGD(list(classifier().parameters()), lr=0.1)


def test_sum_reduction_is_detected():
    x, y = blobs(32)

    def closure_for(model, opt):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y, reduction="sum")
            loss.backward()
            return loss

        return closure

    model = classifier()
    opt = NGD(model, lr=0.1, fisher_type="true")
    with pytest.raises(ValueError, match="sum-reduced"):
        opt.step(closure_for(model, opt))
    model = classifier()
    opt = NGD(model, lr=0.1)
    with pytest.warns(UserWarning, match="sum-reduced"):
        opt.step(closure_for(model, opt))


def test_true_fisher_rejects_non_cross_entropy_losses():
    x, _ = blobs(32)
    model = classifier()
    opt = NGD(model, lr=0.1, fisher_type="true")

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="cross-entropy"):
        opt.step(closure)


def test_two_forward_passes_in_one_step_are_rejected():
    x, y = blobs(32)
    model = classifier()
    opt = NGD(model, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x + 1), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="exactly once"):
        opt.step(closure)


def test_hooks_are_inert_outside_steps():
    """Forward/backward passes outside step() (validation, other callbacks) record nothing."""
    x, y = blobs(32)
    model = classifier()
    opt = NGD(model, lr=0.1, fisher_type="true")
    F.cross_entropy(model(x), y).backward()
    assert opt._capture is None
    with torch.no_grad(), opt.capture():
        model(x)
    assert not opt._capture.calls and opt._capture.root_calls == 0


def test_lightning_trainer_fit():
    lightning = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    x, y = blobs(192)

    class Tiny(lightning.LightningModule):
        def __init__(self, fisher_type: str) -> None:
            super().__init__()
            self.net = classifier()
            self.fisher_type = fisher_type
            self.seen: list[dict] = []

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return F.cross_entropy(self(inputs), targets)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.seen.append(dict(self.optimizers().optimizer.stats))

        def configure_optimizers(self):
            return NGD(self.net, fisher_type=self.fisher_type, **SETTINGS[self.fisher_type])

    for fisher_type in ("empirical", "true"):
        module = Tiny(fisher_type)
        before = full_loss(module.net, x, y)
        start = copy.deepcopy(module.net.state_dict())
        trainer = lightning.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
        assert len(module.seen) == 18
        assert all(not s["skipped"] and s["kappa"] > 0 for s in module.seen)
        assert all(s["batch_size"] == 32 for s in module.seen)
        assert any(not torch.equal(v, start[k]) for k, v in module.net.state_dict().items())
        assert full_loss(module.net, x, y) < 0.5 * before


def test_deep_copied_model_gets_inert_hooks():
    x, y = blobs(64)
    model = classifier()
    opt = NGD(model, lr=0.05)
    clone = copy.deepcopy(model)  # e.g. an EMA or SWA copy
    with opt.capture():
        F.cross_entropy(clone(x), y).backward()  # the copy's hooks must not record
    assert not opt._capture.calls and opt._capture.root_calls == 0
    opt._capture = None
    train(model, opt, x, y, steps=2)
    assert opt.stats["skipped"] is False


class SideBranch(nn.Module):
    """A Linear whose output never reaches the loss (its parameters get no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = classifier()
        self.side = nn.Linear(8, 3)

    def forward(self, x):
        self.side(x)
        return self.body(x)


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_layer_outside_the_loss_is_left_alone(fisher_type):
    x, y = blobs(64)
    model = SideBranch()
    side = copy.deepcopy(model.side.state_dict())
    opt = NGD(model, fisher_type=fisher_type, **SETTINGS[fisher_type])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = train(model, opt, x, y, steps=5)
    assert all(math.isfinite(v) for v in losses)
    for k, v in model.side.state_dict().items():
        assert torch.equal(v, side[k])


def test_lr_scheduler_drives_the_step_size():
    x, y = blobs(64)
    model_a, model_b = classifier(), classifier()
    opt_a = NGD(model_a, lr=0.2, alpha=1.0)
    opt_b = NGD(model_b, lr=0.1, alpha=1.0)
    torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5).step()
    assert opt_a.param_groups[0]["lr"] == pytest.approx(0.1)
    train(model_a, opt_a, x, y, steps=1)
    train(model_b, opt_b, x, y, steps=1)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_extra_param_groups_are_rejected():
    opt = NGD(classifier(), lr=0.1)
    with pytest.raises(ValueError, match="param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
