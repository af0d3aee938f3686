"""Check at setup, never crash training: one test per finding of the suite issue, section 2."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_curvature.callbacks as cb
from lightning_curvature.checks import ArgumentError

FAST = {"num_samples": 32, "batch_size": 32, "every_n_epochs": 1}


def _fit(tiny, tmp_path, callbacks, module=None, data=None, **kwargs):
    torch.manual_seed(0)
    t = tiny.trainer(tmp_path, callbacks, max_epochs=kwargs.pop("max_epochs", 1), **kwargs)
    t.fit(module or tiny.Module(), data or tiny.loader(tiny.make_dataset(n=64)))
    return t


# -- construction ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        ("LocalLearningCoefficient", {"runaway_factor": math.nan}, "runaway_factor"),
        ("LocalLearningCoefficient", {"step_size": "1e-4"}, "step_size"),
        ("LocalLearningCoefficient", {"step_size": math.nan}, "step_size"),
        ("HessianTrace", {"seed": 1.5}, "seed"),
        ("HessianTrace", {"num_probes": "10"}, "num_probes"),
        ("HessianSpectrum", {"sigma": math.inf}, "sigma"),
        ("HessianSpectrum", {"num_iters": 2.0}, "num_iters"),
        ("LossProjection", {"num_random_projections": 1}, "num_random_projections"),
        ("LossProjection", {"loss_rise": math.nan}, "loss_rise"),
        ("HessianEigenvalues", {"tol": "small"}, "tol"),
        ("HessianTrace", {"loss_fn": nn.CrossEntropyLoss}, "CrossEntropyLoss()"),
        ("HessianTrace", {"name": "a/b"}, "name"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(cls, kwargs, name):
    with pytest.raises(ArgumentError, match=f"`?{name}"):
        getattr(cb, cls)(**kwargs)


# -- the loss contract, before the first training step ---------------------------------------
def _setup_error(tiny, tmp_path, module=None, data=None, **cb_kwargs):
    trace = cb.HessianTrace(**{**FAST, **cb_kwargs})
    t = tiny.trainer(tmp_path, [trace], max_epochs=1)
    with pytest.raises(ValueError) as info:
        t.fit(module or tiny.Module(), data or tiny.loader(tiny.make_dataset(n=64)))
    assert t.global_step == 0, "the error must come before any training step"
    return str(info.value)


def test_sum_reduced_loss_is_refused_at_setup(tiny, tmp_path):
    msg = _setup_error(tiny, tmp_path, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    assert "sums over the batch" in msg and "reduction='mean'" in msg


def test_unreduced_loss_is_refused_at_setup(tiny, tmp_path):
    msg = _setup_error(tiny, tmp_path, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    assert "not a scalar" in msg and "mean" in msg


def test_loss_class_on_the_module_is_refused_at_setup(tiny, tmp_path):
    module = tiny.Module(with_loss_fn=False)
    module.loss_fn = nn.CrossEntropyLoss
    msg = _setup_error(tiny, tmp_path, module=module)
    assert "CrossEntropyLoss()" in msg


def test_model_returning_a_tuple_is_refused_at_setup(tiny, tmp_path):
    class TupleModule(type(tiny.Module())):
        def forward(self, x):
            return self.net(x), x

    msg = _setup_error(tiny, tmp_path, module=TupleModule())
    assert "tuple" in msg and "forward()" in msg


def test_dict_batches_are_refused_at_setup(tiny, tmp_path):
    base = tiny.make_dataset(n=64)

    class Dicts(Dataset):
        def __len__(self):
            return len(base)

        def __getitem__(self, i):
            x, y = base[i]
            return {"x": x, "y": y}

    class DictModule(type(tiny.Module())):
        def training_step(self, batch, batch_idx):
            return self._criterion(self(batch["x"]), batch["y"])

    msg = _setup_error(tiny, tmp_path, module=DictModule(), data=DataLoader(Dicts(), 16))
    assert "(inputs, targets)" in msg and "dict" in msg


def test_finite_loss_with_nan_gradient_names_the_cause(tiny, tmp_path):
    def sqrt_at_zero(outputs, targets):
        # finite value, NaN derivative: d sqrt(u)/du at u = 0 times 0
        return nn.functional.cross_entropy(outputs, targets) + torch.sqrt(0.0 * outputs.sum())

    msg = _setup_error(tiny, tmp_path, loss_fn=sqrt_at_zero)
    assert "gradient has NaN" in msg


def test_impossible_budget_is_refused_with_its_memory(tiny, tmp_path):
    msg = _setup_error(tiny, tmp_path, method="hutchpp", num_matvecs=10**12)
    assert "GiB" in msg


# -- during training: warn, skip, continue ---------------------------------------------------
def test_an_engine_failure_mid_training_warns_and_training_continues(tiny, tmp_path, monkeypatch):
    from lightning_curvature import curvature

    def broken(*args, **kwargs):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(curvature, "spectral_density", broken)
    spectrum = cb.HessianSpectrum(num_iters=4, num_points=16, **FAST)
    trace = cb.HessianTrace(num_probes=3, krylov_iters=4, **FAST)
    with pytest.warns(UserWarning, match="engine exploded"):
        t = _fit(tiny, tmp_path, [spectrum, trace], max_epochs=2)
    assert t.current_epoch == 2
    logged = tiny.scalars(t.logger.log_dir)
    assert "curvature/negative_fraction" not in logged
    assert sorted(logged["curvature/trace"]) == [1, 2]


def test_random_forward_in_train_mode_warns_and_skips(tiny, tmp_path):
    trace = cb.HessianTrace(num_probes=3, krylov_iters=4, eval_mode=False, **FAST)
    with pytest.warns(UserWarning, match="skipped for this epoch"):
        t = _fit(tiny, tmp_path, [trace], module=tiny.Module(dropout=0.5))
    assert "curvature/trace" not in tiny.scalars(t.logger.log_dir)


def test_float64_training_is_measured_in_float64(tiny, tmp_path):
    trace = cb.HessianTrace(num_probes=3, krylov_iters=4, measure_on_train_start=True, **FAST)
    t = _fit(tiny, tmp_path, [trace], precision="64-true")
    logged = tiny.scalars(t.logger.log_dir)
    assert sorted(logged["curvature/trace"]) == [0, 1]
    assert all(math.isfinite(v) for v in logged["curvature/trace"].values())


def test_two_instances_need_distinct_names_and_then_log_distinct_tags(tiny, tmp_path):
    a = cb.HessianTrace(num_probes=3, krylov_iters=4, **FAST)
    b = cb.HessianTrace(num_probes=3, krylov_iters=4, eval_mode=False, seed=1, **FAST)
    with pytest.raises(ValueError, match="name="):
        _fit(tiny, tmp_path / "clash", [a, b])
    c = cb.HessianTrace(
        num_probes=3, krylov_iters=4, eval_mode=False, seed=1, name="train_mode", **FAST
    )
    assert a.state_key != c.state_key
    t = _fit(tiny, tmp_path / "named", [cb.HessianTrace(num_probes=3, krylov_iters=4, **FAST), c])
    logged = tiny.scalars(t.logger.log_dir)
    assert {"curvature/trace", "curvature/trace/train_mode"} <= set(logged)
    assert {"time/HessianTrace", "time/HessianTrace/train_mode"} <= set(logged)
    assert logged["curvature/trace"][1] != logged["curvature/trace/train_mode"][1]


def test_dashboard_has_one_chart_per_quantity_and_ngd_only_with_ngd():
    layout = cb.dashboard_layout(ngd=False)
    charts = {title: chart for group in layout.values() for title, chart in group.items()}
    assert all(len(chart[1]) == 1 for chart in charts.values() if chart[0] == "Multiline")
    assert not any("ngd/" in str(chart) for chart in charts.values())
    assert any(
        "ngd/kappa" in str(chart) for chart in cb.dashboard_layout(ngd=True)["optimizer"].values()
    )
    lambda_charts = [c for c in charts.values() if "lambda_m" in str(c)]
    assert len(lambda_charts) == 2
    # helper tags live under bands/ (margins), never as a chart of their own
    margins = [c for c in charts.values() if c[0] == "Margin"]
    assert margins and all(t.startswith("bands/") for c in margins for t in c[1][1:])


def test_dashboard_follows_the_trainers_callbacks():
    named = cb.HessianTrace(name="big", per_layer=True)
    layout = cb.dashboard_layout([named, cb.OptimizerMonitor()], ngd=False)
    tags = str(layout)
    assert "curvature/trace/big" in tags and "lambda_max" not in tags
    assert "time/HessianTrace/big" in tags
    assert "^curvature/trace_layer/.*/big$" in tags  # the per-tensor chart of that instance
    plain = str(cb.dashboard_layout([cb.HessianTrace(per_layer=False)], ngd=False))
    assert "trace_layer" not in plain


def test_nan_gradient_mid_training_warns_with_the_cause_and_skips(tiny, tmp_path):
    import lightning as L

    class TurnsBad:
        broken = False

        def __call__(self, outputs, targets):
            loss = nn.functional.cross_entropy(outputs, targets)
            return loss + torch.sqrt(0.0 * outputs.sum()) if self.broken else loss

    loss_fn = TurnsBad()

    class Break(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            loss_fn.broken = True

    trace = cb.HessianTrace(num_probes=3, krylov_iters=4, loss_fn=loss_fn, **FAST)
    with pytest.warns(UserWarning, match="gradient has NaN"):
        t = _fit(tiny, tmp_path, [Break(), trace], max_epochs=2)
    assert t.current_epoch == 2
    assert "curvature/trace" not in tiny.scalars(t.logger.log_dir)
