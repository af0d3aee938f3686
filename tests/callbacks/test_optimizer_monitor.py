"""OptimizerMonitor and CurvatureDashboard (no curvature engine needed)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_curvature.callbacks import CurvatureDashboard, OptimizerMonitor


class GradRecorder(L.Callback):
    """Ground truth for plain SGD: the update is lr * grad, so its norm is lr * ||grad||."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.per_epoch: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        sq = sum(float((p.grad.double() ** 2).sum()) for p in pl_module.parameters())
        self.per_epoch.setdefault(trainer.current_epoch + 1, []).append(self.lr * sq**0.5)


def test_update_norm_is_the_epoch_mean_of_sgd_steps(tiny, tmp_path):
    torch.manual_seed(0)
    rec = GradRecorder(lr=0.05)
    t = tiny.trainer(tmp_path, [OptimizerMonitor(every_n_steps=1), rec], max_epochs=2)
    t.fit(tiny.Module(lr=0.05, momentum=0.0), tiny.loader(tiny.make_dataset(n=100)))
    logged = tiny.scalars(t.logger.log_dir)["optim/update_norm"]
    assert sorted(logged) == [1, 2]
    for epoch, norms in rec.per_epoch.items():
        assert len(norms) == 4
        assert logged[epoch] == pytest.approx(sum(norms) / len(norms), rel=1e-5)


def test_every_n_steps_averages_the_sampled_steps(tiny, tmp_path):
    torch.manual_seed(0)
    rec = GradRecorder(lr=0.05)
    t = tiny.trainer(tmp_path, [OptimizerMonitor(every_n_steps=3), rec], max_epochs=2)
    t.fit(tiny.Module(lr=0.05, momentum=0.0), tiny.loader(tiny.make_dataset(n=224)))
    logged = tiny.scalars(t.logger.log_dir)["optim/update_norm"]
    for epoch, norms in rec.per_epoch.items():
        assert len(norms) == 7
        sampled = norms[::3]  # steps 0, 3, 6 of each epoch
        assert logged[epoch] == pytest.approx(sum(sampled) / len(sampled), rel=1e-5)


class StepDeltaRecorder(L.Callback):
    """The per-step definition, read at once: sqrt of the Python sum of squared per-tensor norms
    of θ_{t+1} − θ_t (the value OptimizerMonitor logged before it deferred the reads)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.per_epoch: dict[int, list[float]] = {}
        self._before: list[torch.Tensor] | None = None
        self._step = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._step = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        take = self._step % self.every == 0
        self._step += 1
        self._before = [p.detach().clone() for p in pl_module.parameters()] if take else None

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        if self._before is None:
            return
        diffs = [b - p.detach() for b, p in zip(self._before, pl_module.parameters(), strict=True)]
        norm = sum(float(torch.linalg.vector_norm(d)) ** 2 for d in diffs) ** 0.5
        self.per_epoch.setdefault(trainer.current_epoch + 1, []).append(norm)
        self._before = None


@pytest.mark.parametrize("every", [1, 3])
def test_update_norm_is_bitwise_the_per_step_definition(tiny, tmp_path, monkeypatch, every):
    # Momentum SGD (the update is not lr·grad) and a mean taken from the pending norms at the
    # epoch's end: the logged float must equal the per-step definition exactly.
    from lightning_curvature.callbacks import sink

    logged: dict[int, float] = {}
    original = sink.MetricSink.scalars

    def capture(self, values):
        if "optim/update_norm" in values:
            logged[self.step] = values["optim/update_norm"]
        return original(self, values)

    monkeypatch.setattr(sink.MetricSink, "scalars", capture)
    torch.manual_seed(0)
    rec = StepDeltaRecorder(every)
    t = tiny.trainer(tmp_path, [OptimizerMonitor(every_n_steps=every), rec], max_epochs=2)
    t.fit(tiny.Module(lr=0.05, momentum=0.9), tiny.loader(tiny.make_dataset(n=224)))
    assert sorted(logged) == [1, 2]
    for epoch, norms in rec.per_epoch.items():
        total = 0.0
        for n in norms:
            total += n
        assert logged[epoch] == total / len(norms)


def test_every_n_steps_is_validated():
    with pytest.raises(ValueError, match="every_n_steps"):
        OptimizerMonitor(every_n_steps=0)


def test_update_norm_skips_batches_without_a_step(tiny, tmp_path):
    torch.manual_seed(0)
    rec = GradRecorder(lr=0.05)
    t = tiny.trainer(
        tmp_path, [OptimizerMonitor(every_n_steps=1), rec], max_epochs=1, accumulate_grad_batches=2
    )
    t.fit(tiny.Module(lr=0.05, momentum=0.0), tiny.loader(tiny.make_dataset(n=128)))
    logged = tiny.scalars(t.logger.log_dir)["optim/update_norm"]
    assert len(rec.per_epoch[1]) == 2
    assert logged[1] == pytest.approx(sum(rec.per_epoch[1]) / 2, rel=1e-5)


class NGDClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        )
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        from lightning_curvature.optim import NGD

        return NGD(self.net, lr=0.05, alpha=1.0)


class StatsRecorder(L.Callback):
    def __init__(self):
        self.stats: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        self.stats.append(dict(trainer.optimizers[0].stats))


def test_ngd_stats_are_logged_as_epoch_means(tiny, tmp_path):
    torch.manual_seed(0)
    rec = StatsRecorder()
    t = tiny.trainer(tmp_path, [OptimizerMonitor(), rec], max_epochs=1)
    t.fit(NGDClassifier(), tiny.loader(tiny.make_dataset(n=96)))
    logged = {k: v[1] for k, v in tiny.scalars(t.logger.log_dir).items()}
    assert len(rec.stats) == 3
    for key, tag in (("kappa", "ngd/kappa"), ("fisher_trace", "ngd/fisher_trace")):
        expected = sum(float(s[key]) for s in rec.stats) / len(rec.stats)
        assert logged[tag] == pytest.approx(expected, rel=1e-5)
    expected = sum(float(s["update_norm"]) for s in rec.stats) / len(rec.stats)
    assert logged["optim/update_norm"] == pytest.approx(expected, rel=1e-4)


def test_dashboard_writes_layout_once(tiny, tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2

    import lightning_curvature.callbacks as cb

    dash = CurvatureDashboard()
    never = {"every_n_epochs": 100, "num_samples": 16}  # on the Trainer, not measuring here
    callbacks = [
        cb.HessianTrace(**never),
        cb.HessianEigenvalues(**never),
        cb.LocalLearningCoefficient(**never),
        OptimizerMonitor(),
        dash,
    ]
    t = tiny.trainer(tmp_path, callbacks, max_epochs=1)
    t.fit(tiny.Module(), tiny.loader(tiny.make_dataset(n=64)))
    events = [
        e
        for acc in tiny.read_events(t.logger.log_dir)
        for e in acc.Tensors("custom_scalars__config__")
    ]
    assert len(events) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    margin = charts["tr H ± stderr"].margin.series[0]
    assert (margin.value, margin.lower, margin.upper) == (
        "curvature/trace",
        "bands/curvature/trace_lower",
        "bands/curvature/trace_upper",
    )
    llc = charts["λ̂ ± std over chains"].margin.series[0]
    assert llc.value == "llc/lambda_hat"
    tags = json.dumps([list(c.multiline.tag) for c in charts.values()])
    for needed in ("lambda_max", "lambda_min", "optim/update_norm", "time/HessianTrace"):
        assert needed in tags
    # SGD: no NGD charts; no spectrum or landscape callback: no charts for them either
    for absent in ("ngd/", "negative_fraction", "landscape/"):
        assert absent not in tags
