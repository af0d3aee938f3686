"""MLP / LeNet-5 shapes and parameter counts; the ImageClassifier's optimizers and logging."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature.models import MLP, ImageClassifier, LeNet5, num_parameters


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet5_is_the_classic_61706_parameter_network():
    model = LeNet5()
    assert _count(model) == 61_706
    # layer by layer, written out by hand: conv 1->6 5x5, conv 6->16 5x5, fc 400-120-84-10
    expected = [6 * 1 * 25, 6, 16 * 6 * 25, 16, 120 * 400, 120, 84 * 120, 84, 10 * 84, 10]
    assert [p.numel() for p in model.parameters()] == expected
    x = torch.randn(5, 1, 28, 28)
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, 16, 5, 5)  # padding 2 keeps 28x28 -> 14 -> 10 -> 5
    assert model(x[:, 0]).shape == (5, 10)  # a missing channel axis is added
    assert LeNet5(num_classes=3)(x).shape == (5, 3)
    assert _count(LeNet5(activation="tanh", pooling="avg")) == 61_706


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [((256, 256), 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10),
     ((), 784 * 10 + 10), ((32,), 784 * 32 + 32 + 32 * 10 + 10)],
)  # fmt: skip
def test_mlp_parameter_count_and_shapes(hidden, expected):
    model = MLP(hidden_sizes=hidden)
    assert _count(model) == expected == num_parameters(model)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert model(torch.randn(3, 784)).shape == (3, 10)
    assert _count(MLP(hidden_sizes=(256, 256))) == 269_322


def test_mlp_activation_and_depth():
    model = MLP(input_size=4, hidden_sizes=(3, 2), num_classes=2, activation="tanh")
    kinds = [type(m).__name__ for m in model.net]
    assert kinds == ["Flatten", "Linear", "Tanh", "Linear", "Tanh", "Linear"]


@pytest.mark.parametrize(
    ("factory", "name"),
    [(lambda: MLP(activation="swishy"), "activation"), (lambda: MLP(hidden_sizes=(0,)), "hidden"),
     (lambda: MLP(num_classes=1), "num_classes"), (lambda: MLP(input_size=0), "input_size"),
     (lambda: LeNet5(pooling="median"), "pooling"), (lambda: LeNet5(num_classes=1), "num_classes"),
     (lambda: ImageClassifier(MLP(), optimizer="adam"), "optimizer"),
     (lambda: ImageClassifier(MLP(), lr=0), "lr"),
     (lambda: ImageClassifier(MLP(), momentum=1.0), "momentum"),
     (lambda: ImageClassifier(MLP(), alpha=0.0), "alpha"),
     (lambda: ImageClassifier(MLP(), eps=0.0), "eps"),
     (lambda: ImageClassifier(MLP(), fisher_type="mc?"), "fisher_type"),
     (lambda: ImageClassifier(MLP(), weight_decay=-1.0), "weight_decay"),
     (lambda: ImageClassifier(MLP(), optimizer="online_ngd", rank=0), "rank"),
     (lambda: ImageClassifier(MLP(), update_period=0), "update_period"),
     (lambda: ImageClassifier(MLP(), eta=1.0), "eta"),
     (lambda: ImageClassifier(MLP(), lr="0.1"), "lr"),
     (lambda: ImageClassifier(MLP(), optimizer="ngd", damping="kfac"), "damping"),
     (lambda: ImageClassifier(MLP(), optimizer="ngd", rescale=1), "rescale"),
     (lambda: ImageClassifier("mlp"), "model")],
)  # fmt: skip
def test_bad_arguments_raise_value_error(factory, name):
    with pytest.raises(ValueError, match=name):
        factory()


def test_classifier_sgd_optimizer_and_loss():
    module = ImageClassifier(MLP(hidden_sizes=(8,)), lr=0.3, momentum=0.5, weight_decay=1e-4)
    assert isinstance(module.loss_fn, nn.CrossEntropyLoss)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.5, 1e-4)
    assert sum(p.numel() for p in group["params"]) == _count(module.model)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    expected = nn.functional.cross_entropy(module.model(x), y)
    torch.testing.assert_close(module.loss_fn(module(x), y), expected)


@pytest.mark.parametrize(
    ("kwargs", "damping", "rescale"),
    [
        ({}, "per_parameter", False),
        ({"damping": "per_sample", "rescale": True}, "per_sample", True),
    ],
)
def test_classifier_passes_ngd_damping_and_rescale(kwargs, damping, rescale):
    from lightning_curvature.optim import NGD

    opt = ImageClassifier(MLP(hidden_sizes=(8,)), optimizer="ngd", **kwargs).configure_optimizers()
    assert isinstance(opt, NGD)
    assert (opt.damping, opt.rescale) == (damping, rescale)


def test_restore_optimizer_state_flag_drops_optimizer_state_on_load():
    ckpt = {"optimizer_states": [{"state": {}}], "lr_schedulers": [{}]}
    ImageClassifier(MLP(), restore_optimizer_state=True).on_load_checkpoint(ckpt)
    assert ckpt["optimizer_states"] == [{"state": {}}]
    ImageClassifier(MLP(), restore_optimizer_state=False).on_load_checkpoint(ckpt)
    assert ckpt["optimizer_states"] == [] and ckpt["lr_schedulers"] == []


def _tiny_loaders(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=32)


def _trainer(**kwargs):
    return pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


class _Recorder(Logger):
    """Keeps every ``log_metrics`` call: (metrics, step)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))


def _steps_of(recorder, key):
    return [step for metrics, step in recorder.calls if key in metrics]


def test_sgd_fit_logs_epoch_metrics_on_epoch_axis_and_no_step_metric(tmp_path):
    train, val = _tiny_loaders()
    torch.manual_seed(0)
    module = ImageClassifier(MLP(hidden_sizes=(16,)), lr=0.1)
    recorder = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=recorder, callbacks=[ckpt],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
    )  # fmt: skip
    trainer.fit(module, train, val)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in metrics and torch.isfinite(metrics[key])
        assert _steps_of(recorder, key) == [1, 2]  # completed epochs, sanity check not logged
    assert "step" not in metrics and "ngd/kappa" not in metrics
    # 64 samples / batch 16 = 4 optimizer steps per epoch: names carry the global step
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    # the epoch means are the sample-weighted means of the batch losses (eval mode, end of fit)
    x, y = train.dataset.tensors
    module.eval()
    with torch.no_grad():
        val_loss = float(nn.functional.cross_entropy(module(x), y))
    assert float(metrics["val/loss"]) == pytest.approx(val_loss, rel=1e-5)


def test_ngd_fit_stats_are_logged_by_the_optimizer_monitor_only():
    from lightning_curvature.callbacks import OptimizerMonitor
    from lightning_curvature.optim import NGD

    train, val = _tiny_loaders()
    torch.manual_seed(0)
    module = ImageClassifier(MLP(hidden_sizes=(16,)), optimizer="ngd", lr=0.05, alpha=0.1,
                             eps=1e-8, fisher_type="true")  # fmt: skip
    assert isinstance(module.configure_optimizers(), NGD)
    trainer = _trainer()
    trainer.fit(module, train, val)
    assert not any(k.startswith(("ngd/", "optim/")) for k in trainer.callback_metrics)
    torch.manual_seed(0)
    module = ImageClassifier(MLP(hidden_sizes=(16,)), optimizer="ngd", lr=0.05, alpha=0.1,
                             eps=1e-8, fisher_type="true")  # fmt: skip
    trainer = _trainer(callbacks=[OptimizerMonitor()])
    trainer.fit(module, train, val)
    metrics = trainer.callback_metrics
    for key in ("ngd/kappa", "ngd/fisher_trace", "optim/update_norm"):
        assert key in metrics and torch.isfinite(metrics[key]) and float(metrics[key]) > 0
    # kappa = alpha * max(tr F, eps) / d is linear in tr F (> eps here), so the epoch means obey it
    d = _count(module.model)
    kappa, trace = float(metrics["ngd/kappa"]), float(metrics["ngd/fisher_trace"])
    assert kappa == pytest.approx(0.1 * trace / d, rel=1e-4)


def test_online_ngd_optimizer_hyperparameters_and_fit_with_monitor():
    from lightning_curvature.callbacks import OptimizerMonitor
    from lightning_curvature.optim import OnlineNGD

    module = ImageClassifier(MLP(hidden_sizes=(16,)), optimizer="online_ngd", lr=0.05, alpha=0.1,
                             eps=1e-8, rank=6, update_period=3, eta=0.2, momentum=0.5,
                             weight_decay=1e-4)  # fmt: skip
    opt = module.configure_optimizers()
    assert isinstance(opt, OnlineNGD)
    group = opt.param_groups[0]
    expected = {"lr": 0.05, "alpha": 0.1, "eps": 1e-8, "rank": 6, "update_period": 3, "eta": 0.2,
                "momentum": 0.5, "weight_decay": 1e-4}  # fmt: skip
    assert {k: group[k] for k in expected} == expected
    train, val = _tiny_loaders()
    torch.manual_seed(0)
    trainer = _trainer(callbacks=[OptimizerMonitor()])
    trainer.fit(module, train, val)
    metrics = trainer.callback_metrics
    for key in ("ngd/kappa", "ngd/fisher_trace", "optim/update_norm", "train/loss"):
        assert key in metrics and torch.isfinite(metrics[key]) and float(metrics[key]) > 0
    # one factor for every axis of size > 1 of the MLP's tensors
    opt = trainer.optimizers[0]
    assert opt.stats["num_factors"] == sum(
        sum(1 for n in p.shape if n > 1) for p in module.model.parameters()
    )
