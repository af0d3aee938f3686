"""The shared machinery of CurvatureCallback, tested with a probe callback (no engine needed)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch.func import functional_call

from lightning_curvature.callbacks import CurvatureCallback, Measurement
from lightning_curvature.callbacks.guard import measurement_context
from lightning_curvature.callbacks.measurement_set import derive_seed, draw_indices


class Probe(CurvatureCallback):
    """Measures the exact gradient norm of the loss on the measurement set, then misbehaves."""

    def __init__(self, *, nan_tag: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.nan_tag = nan_tag
        self.calls: list[dict] = []

    def measure(self, ctx):
        params = dict(ctx.pl_module.named_parameters())
        x = torch.cat([b[0] for b in ctx.data.batches])
        y = torch.cat([b[1] for b in ctx.data.batches])
        loss = ctx.loss_fn(functional_call(ctx.pl_module, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        gnorm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        # Misbehave: every global RNG stream, the mode and .grad are disturbed.
        torch.randn(3)
        np.random.rand(3)  # noqa: NPY002
        random.random()
        ctx.pl_module.train(not ctx.pl_module.training)
        for p in ctx.pl_module.parameters():
            p.grad = torch.ones_like(p)
        self.calls.append(
            {
                "step": ctx.step,
                "x": x.clone(),
                "y": y.clone(),
                "probe": torch.rand(4, generator=ctx.generator),
                "grad_enabled": torch.is_grad_enabled(),
                "inference": torch.is_inference_mode_enabled(),
                "training": ctx.pl_module.training,
            }
        )
        scalars = {"probe/grad_norm": gnorm, "probe/loss": float(loss.detach())}
        if self.nan_tag:
            scalars["probe/bad"] = math.nan
        return Measurement(scalars=scalars)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_samples": 0},
        {"num_samples": 2.5},
        {"batch_size": 0},
        {"every_n_epochs": 0},
        {"seed": -1},
        {"loss_fn": "cross_entropy"},
        {"eval_mode": "yes"},
        {"measure_on_train_start": 1},
    ],
)
def test_shared_arguments_are_validated_at_construction(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        Probe(**kwargs)


def test_missing_loss_function_fails_at_setup_with_guidance(tiny, tmp_path):
    ds = tiny.make_dataset()
    t = tiny.trainer(tmp_path, [Probe()], max_epochs=1)
    with pytest.raises(ValueError, match=r"loss_fn=.*self\.loss_fn") as info:
        t.fit(tiny.Module(with_loss_fn=False), tiny.loader(ds))
    assert "Probe" in str(info.value)
    # the same module works once a loss is passed to the callback
    probe = Probe(loss_fn=torch.nn.CrossEntropyLoss())
    tiny.trainer(tmp_path, [probe], max_epochs=1).fit(
        tiny.Module(with_loss_fn=False), tiny.loader(ds)
    )
    assert len(probe.calls) == 1


def test_criterion_attribute_is_used(tiny, tmp_path):
    module = tiny.Module(with_loss_fn=False)
    module.criterion = torch.nn.CrossEntropyLoss()
    probe = Probe()
    tiny.trainer(tmp_path, [probe], max_epochs=1).fit(module, tiny.loader(tiny.make_dataset()))
    assert len(probe.calls) == 1


def test_measurement_set_schedule_logging_and_no_side_effects(tiny, tmp_path):
    torch.manual_seed(0)
    ds = tiny.make_dataset(n=100)
    module = tiny.Module()
    probe = Probe(
        num_samples=40, batch_size=16, every_n_epochs=2, seed=3, measure_on_train_start=True
    )
    t = tiny.trainer(
        tmp_path,
        [probe],
        max_epochs=4,
        inference_mode=True,
        limit_val_batches=2,
        num_sanity_val_steps=2,
    )
    t.fit(module, tiny.loader(ds), tiny.loader(ds, shuffle=False))
    # epoch 0 (before training), then after epochs 2 and 4; never in the sanity check
    assert [c["step"] for c in probe.calls] == [0, 2, 4]
    # fixed measurement set = dataset[indices], the same every time
    idx = draw_indices(100, 40, 3)
    assert len(set(idx.tolist())) == 40
    for c in probe.calls:
        assert torch.equal(c["x"], ds.tensors[0][idx]) and torch.equal(c["y"], ds.tensors[1][idx])
        assert c["grad_enabled"] and not c["inference"]
    # per-epoch generators: reproducible from (seed, epoch), different across epochs
    assert not torch.equal(probe.calls[1]["probe"], probe.calls[2]["probe"])
    g = probe.generator(2, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=g), probe.calls[1]["probe"])
    # logged at x = completed epochs, finite, with a time tag; also in callback_metrics
    logged = tiny.scalars(str(tmp_path))
    assert sorted(logged["probe/grad_norm"]) == [0, 2, 4]
    assert all(v >= 0 for v in logged["time/Probe"].values())
    assert "probe/grad_norm" in t.callback_metrics
    # the model is back in train mode with no .grad left by the probe's misbehaviour
    assert module.training
    assert all(p.grad is None or not torch.all(p.grad == 1) for p in module.parameters())


def test_guard_restores_rng_mode_and_grad():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    model.train()
    model[1].eval()
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002
    random.seed(1)
    expected = (torch.rand(2), np.random.rand(2), random.random())  # noqa: NPY002
    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002
    random.seed(1)
    with torch.inference_mode(), measurement_context(model):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        torch.rand(5)
        np.random.rand(5)  # noqa: NPY002
        random.random()
        model.eval()
        for p in model.parameters():
            p.grad = None
    assert model.training and not model[1].training and model[0].training
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    got = (torch.rand(2), np.random.rand(2), random.random())  # noqa: NPY002
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_non_finite_scalar_is_warned_and_skipped(tiny, tmp_path):
    probe = Probe(nan_tag=True)
    t = tiny.trainer(tmp_path, [probe], max_epochs=1)
    with pytest.warns(UserWarning, match="probe/bad is nan"):
        t.fit(tiny.Module(), tiny.loader(tiny.make_dataset()))
    logged = tiny.scalars(str(tmp_path))
    assert "probe/bad" not in logged and "probe/grad_norm" in logged


def test_non_finite_loss_skips_the_epoch_without_crashing(tiny, tmp_path):
    import lightning as L

    class TurnsNaN:
        """Finite at setup (the dry run passes), NaN once training has started."""

        broken = False

        def __call__(self, outputs, targets):
            loss = torch.nn.functional.cross_entropy(outputs, targets)
            return loss * float("nan") if self.broken else loss

    loss_fn = TurnsNaN()

    class Break(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            loss_fn.broken = True

    probe = Probe(loss_fn=loss_fn)
    t = tiny.trainer(tmp_path, [probe, Break()], max_epochs=2)
    with pytest.warns(UserWarning, match="loss on the measurement set is nan"):
        t.fit(tiny.Module(), tiny.loader(tiny.make_dataset()))
    assert probe.calls == []
    assert t.callback_metrics.get("probe/grad_norm") is None


def test_non_finite_loss_at_setup_stops_fit_before_training(tiny, tmp_path):
    def nan_loss(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets) * float("nan")

    t = tiny.trainer(tmp_path, [Probe(loss_fn=nan_loss)], max_epochs=1)
    with pytest.raises(ValueError, match="finite loss"):
        t.fit(tiny.Module(), tiny.loader(tiny.make_dataset()))
    assert t.global_step == 0


def test_no_logger_warns_and_metrics_still_reach_lightning(tiny, tmp_path):
    probe = Probe()
    t = tiny.trainer(tmp_path, [probe], max_epochs=1, logger=False)
    with pytest.warns(UserWarning, match="no logger"):
        t.fit(tiny.Module(), tiny.loader(tiny.make_dataset()))
    assert math.isfinite(float(t.callback_metrics["probe/grad_norm"]))


def test_state_dict_round_trip_keeps_measurement_set(tiny, tmp_path):
    ds = tiny.make_dataset(n=80)
    probe = Probe(num_samples=20, seed=5)
    tiny.trainer(tmp_path, [probe], max_epochs=1).fit(tiny.Module(), tiny.loader(ds))
    state = probe.state_dict()
    other = Probe(num_samples=20, seed=9)
    other.load_state_dict(state)
    assert other.seed == 5 and torch.equal(other._indices, probe._indices)
    assert torch.equal(state["indices"], draw_indices(80, 20, 5))


def test_derive_seed_mixes_keys():
    seeds = {derive_seed(s, e) for s in range(4) for e in range(4)}
    assert len(seeds) == 16
    assert derive_seed(1, 2) == derive_seed(1, 2)


def test_guard_measures_in_full_precision_under_autocast():
    model = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        with measurement_context(model):
            assert model(x).dtype == torch.float32


def test_progress_follows_the_trainers_progress_bar(tiny, tmp_path, capsys):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_curvature.callbacks import HessianTrace

    ds = tiny.make_dataset(n=64)
    tiny.trainer(
        tmp_path,
        [HessianTrace(num_samples=32, num_probes=4, every_n_epochs=1), TQDMProgressBar()],
        max_epochs=1,
        enable_progress_bar=True,
    ).fit(tiny.Module(), tiny.loader(ds))
    assert "HessianTrace: Krylov-deflated trace" in capsys.readouterr().out
    tiny.trainer(
        tmp_path,
        [HessianTrace(num_samples=32, num_probes=4, every_n_epochs=1)],
        max_epochs=1,
        enable_progress_bar=False,
    ).fit(tiny.Module(), tiny.loader(ds))
    captured = capsys.readouterr()
    assert "Krylov" not in captured.out + captured.err


def test_progress_uses_a_rich_progress_bar_when_that_is_the_trainers():
    from types import SimpleNamespace

    from lightning_curvature.callbacks.progress import MeasurementProgress

    calls = []

    class FakeRich:
        def add_task(self, description, total):
            calls.append(("add", description, total))
            return 7

        def update(self, task, advance):
            calls.append(("update", task, advance))

        def remove_task(self, task):
            calls.append(("remove", task))

    bar = SimpleNamespace(is_enabled=True, progress=FakeRich())
    trainer = SimpleNamespace(progress_bar_callback=bar, is_global_zero=True)
    with MeasurementProgress(trainer, "X: Lanczos", 3) as p:
        p.update(2)
    assert calls == [("add", "[cyan]X: Lanczos", 3), ("update", 7, 2), ("remove", 7)]
    calls.clear()
    bar.is_enabled = False
    with MeasurementProgress(trainer, "X", 3) as p:
        p.update(1)
    assert calls == []


def test_other_loggers_get_scalars_at_the_epoch_axis(tiny, tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    t = tiny.trainer(tmp_path, [Probe(measure_on_train_start=True)], max_epochs=2, logger=logger)
    t.fit(tiny.Module(), tiny.loader(tiny.make_dataset()))
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("probe/grad_norm")]
    assert sorted(int(r["step"]) for r in rows) == [0, 1, 2]


class BadFigure(Probe):
    def measure(self, ctx):
        result = super().measure(ctx)

        def broken():
            raise ValueError("no finite loss values to plot")

        result.figures["probe/figure"] = broken
        return result


def test_a_failing_figure_is_warned_not_fatal(tiny, tmp_path):
    t = tiny.trainer(tmp_path, [BadFigure()], max_epochs=1)
    with pytest.warns(UserWarning, match="could not draw probe/figure"):
        t.fit(tiny.Module(), tiny.loader(tiny.make_dataset()))
    assert "probe/grad_norm" in tiny.scalars(t.logger.log_dir)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        ("HessianTrace", {"num_matvecs": 3}),
        ("HessianEigenvalues", {"max_iters": 1}),
        ("HessianEigenvalues", {"tol": 0.0}),
        ("HessianSpectrum", {"num_runs": 0}),
        ("HessianSpectrum", {"sigma": -1.0}),
        ("LocalLearningCoefficient", {"num_chains": 0}),
        ("LocalLearningCoefficient", {"step_size": 0.0}),
        ("LocalLearningCoefficient", {"localization": -1.0}),
        ("LocalLearningCoefficient", {"nbeta": float("nan")}),
        ("LossProjection", {"steps": 2}),
        ("LossProjection", {"trace_num_points": 4}),
        ("LossProjection", {"normalization": "unit"}),
        ("LossProjection", {"every_n_epochs": 0}),
    ],
)
def test_engine_knobs_are_validated_at_construction(cls, kwargs):
    import lightning_curvature.callbacks as cb

    with pytest.raises(ValueError, match=next(iter(kwargs))):
        getattr(cb, cls)(**kwargs)
