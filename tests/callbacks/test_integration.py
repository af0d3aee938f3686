"""Full-suite fits on tiny synthetic data: tags, images, ground truth, no side effects, resume."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch.func import functional_call

import lightning_curvature.callbacks as cb
from lightning_curvature.callbacks.measurement_set import draw_indices

SMALL = {"num_samples": 64, "batch_size": 32}


def small_suite(seed: int = 0, measure_on_train_start: bool = False, **extra):
    shared = dict(SMALL, seed=seed, measure_on_train_start=measure_on_train_start, every_n_epochs=1)
    shared.update(extra)
    return [
        cb.HessianTrace(num_probes=6, **shared),
        cb.HessianEigenvalues(max_iters=20, **shared),
        cb.HessianSpectrum(num_iters=12, num_points=64, **shared),
        cb.LocalLearningCoefficient(
            num_chains=2, num_draws=20, num_burnin=5, step_size=1e-4, **dict(shared, batch_size=16)
        ),
        cb.LossProjection(
            steps=5, num_random_projections=4, num_trace_directions=4, max_iters=15, **shared
        ),
        cb.OptimizerMonitor(),
        cb.CurvatureDashboard(),
    ]


CONTRACT_SCALARS = [
    "curvature/trace",
    "curvature/trace_stderr",
    "curvature/lambda_max",
    "curvature/lambda_min",
    "curvature/negative_fraction",
    "curvature/negative_fraction_tau",
    "llc/lambda_hat",
    "llc/not_minimum",
    "llc/lambda_hat_std",
    "llc/wbic",
    "llc/init_loss",
    "landscape/random_saddle_fraction",
    "landscape/projection_trace",
    "optim/update_norm",
] + [
    f"time/{name}"
    for name in (
        "HessianTrace",
        "HessianEigenvalues",
        "HessianSpectrum",
        "LocalLearningCoefficient",
        "LossProjection",
    )
]


def test_full_suite_logs_every_contract_tag(tiny, tmp_path):
    torch.manual_seed(0)
    ds = tiny.make_dataset()
    t = tiny.trainer(tmp_path, small_suite(measure_on_train_start=True), max_epochs=2)
    t.fit(tiny.Module(), tiny.loader(ds))
    log_dir = t.logger.log_dir
    logged = tiny.scalars(log_dir)
    for tag in CONTRACT_SCALARS:
        assert tag in logged, tag
        assert all(math.isfinite(v) for v in logged[tag].values()), tag
    assert sorted(logged["curvature/trace"]) == [0, 1, 2]
    assert set(logged["llc/not_minimum"].values()) <= {0.0, 1.0}
    assert all(0.0 <= v <= 1.0 for v in logged["curvature/negative_fraction"].values())
    assert sorted(logged["optim/update_norm"]) == [1, 2]
    imgs = tiny.images(log_dir)
    for tag in ("landscape/hessian", "landscape/random", "curvature/spectrum", "llc/trace"):
        assert tag in imgs and len(imgs[tag]) == 3, tag
    accs = tiny.read_events(log_dir)
    assert any("curvature/spectrum_histogram" in a.Tags()["histograms"] for a in accs)
    assert any("custom_scalars__config__" in a.Tags()["tensors"] for a in accs)
    snaps = sorted(os.listdir(os.path.join(log_dir, "landscape")))
    assert snaps == [f"{k}_epoch{e:04d}.npz" for k in ("hessian", "random") for e in range(3)]
    # margins for the dashboard bracket the value
    for e, v in logged["curvature/trace"].items():
        s = logged["curvature/trace_stderr"][e]
        assert logged["bands/curvature/trace_lower"][e] == pytest.approx(v - s, rel=1e-5, abs=1e-6)


def _measurement_tensors(ds, num_samples: int, seed: int):
    idx = draw_indices(len(ds), num_samples, seed)
    return ds.tensors[0][idx].double(), ds.tensors[1][idx]


def _dense_hessian(module, x, y):
    model = module.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        params, o = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(np.prod(s))
            params[n] = theta[o : o + k].reshape(s)
            o += k
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    with torch.no_grad():
        model.eval()
        center = float(loss(flat0))
    return torch.func.hessian(loss)(flat0), center


def test_trace_and_eigenvalues_match_dense_hessian_of_the_measurement_set(tiny, tmp_path):
    torch.manual_seed(1)
    ds = tiny.make_dataset(n=150)
    module = tiny.Module()
    d = sum(p.numel() for p in module.parameters())
    shared = {"num_samples": 50, "batch_size": 17, "seed": 4, "every_n_epochs": 1}
    # Krylov-deflated trace on the shared Lanczos run (d steps: the whole space), and the
    # stand-alone Hutch++ (3d + 3 products: exact) as a named second instance.
    trace_cb = cb.HessianTrace(krylov_iters=d, num_probes=4, **shared)
    hutchpp = cb.HessianTrace(method="hutchpp", num_matvecs=3 * d + 3, name="hutchpp", **shared)
    eig_cb = cb.HessianEigenvalues(max_iters=d, tol=1e-8, **shared)
    spectrum_cb = cb.HessianSpectrum(num_iters=d, num_runs=8, num_points=64, **shared)
    t = tiny.trainer(tmp_path, [trace_cb, hutchpp, eig_cb, spectrum_cb], max_epochs=1)
    t.fit(module, tiny.loader(ds))
    logged = tiny.scalars(t.logger.log_dir)
    x, y = _measurement_tensors(ds, 50, 4)
    H, _ = _dense_hessian(module, x, y)
    evals = torch.linalg.eigvalsh(H)
    assert logged["curvature/trace"][1] == pytest.approx(float(torch.trace(H)), rel=1e-3)
    assert logged["curvature/trace/hutchpp"][1] == pytest.approx(float(torch.trace(H)), rel=1e-3)
    assert logged["curvature/lambda_max"][1] == pytest.approx(float(evals[-1]), rel=1e-3)
    assert logged["curvature/lambda_min"][1] == pytest.approx(float(evals[0]), rel=1e-3, abs=1e-5)
    # the index: share of the materialized Hessian's eigenvalues below -tau (tau as logged)
    tau = logged["curvature/negative_fraction_tau"][1]
    exact_index = float((evals < -tau).double().mean())
    stderr = logged["curvature/negative_fraction_stderr"][1]
    assert abs(logged["curvature/negative_fraction"][1] - exact_index) <= 4 * stderr + 0.02


def test_llc_uses_training_set_size_and_measurement_loss(tiny, tmp_path):
    torch.manual_seed(2)
    ds = tiny.make_dataset(n=120)
    module = tiny.Module()
    llc = cb.LocalLearningCoefficient(
        num_samples=60, batch_size=20, num_chains=2, num_draws=30, every_n_epochs=1
    )
    t = tiny.trainer(tmp_path, [llc], max_epochs=1)
    t.fit(module, tiny.loader(ds))
    logged = {k: v[1] for k, v in tiny.scalars(t.logger.log_dir).items()}
    x, y = _measurement_tensors(ds, 60, 0)
    _, center = _dense_hessian(module, x, y)
    assert logged["llc/init_loss"] == pytest.approx(center, rel=1e-5)
    # WBIC = n E[L] and lambda_hat = nbeta (E[L] - L(w*)) with nbeta = n / ln n, n = 120 (not 60)
    n = 120
    expected_wbic = n * logged["llc/init_loss"] + logged["llc/lambda_hat"] * math.log(n)
    assert logged["llc/wbic"] == pytest.approx(expected_wbic, rel=1e-4)


def test_training_is_bitwise_identical_with_and_without_the_suite(tiny, tmp_path):
    def run(callbacks, sub):
        torch.manual_seed(123)
        module = tiny.Module(dropout=0.3, momentum=0.9)
        ds = tiny.make_dataset()
        t = tiny.trainer(tmp_path / sub, callbacks, max_epochs=2)
        t.fit(module, tiny.loader(ds))  # shuffling draws from the global torch RNG
        return module.state_dict(), t.optimizers[0].state_dict(), torch.rand(3)

    plain = run([], "plain")
    measured = run(small_suite(measure_on_train_start=True), "measured")
    for k, v in plain[0].items():
        assert torch.equal(v, measured[0][k]), k
    for k, st in plain[1]["state"].items():
        assert torch.equal(st["momentum_buffer"], measured[1]["state"][k]["momentum_buffer"])
    assert torch.equal(plain[2], measured[2])  # global RNG left exactly where training left it


def test_resume_from_checkpoint_gives_the_same_later_values(tiny, tmp_path):
    def suite():
        return [c for c in small_suite(seed=7) if isinstance(c, cb.CurvatureCallback)]

    ds = tiny.make_dataset()
    torch.manual_seed(5)
    full = tiny.trainer(tmp_path / "full", suite(), max_epochs=4)
    full.fit(tiny.Module(), tiny.loader(ds, shuffle=False))

    torch.manual_seed(5)
    first = tiny.trainer(tmp_path / "part", suite(), max_epochs=2)
    first.fit(tiny.Module(), tiny.loader(ds, shuffle=False))
    ckpt = str(tmp_path / "mid.ckpt")
    first.save_checkpoint(ckpt)
    torch.manual_seed(99)  # a resumed run must not depend on the fresh module's init
    second = tiny.trainer(tmp_path / "part", suite(), max_epochs=4)
    second.fit(tiny.Module(), tiny.loader(ds, shuffle=False), ckpt_path=ckpt)

    a = tiny.scalars(full.logger.log_dir)
    b = tiny.scalars(second.logger.log_dir)
    compared = 0
    for tag, series in a.items():
        if tag.startswith("time/"):
            continue
        # The HVP-free trace divides loss differences by radius^2; its engine chooses vmap or a
        # loop by timing, so its float rounding (amplified ~1000x) is not reproducible bitwise.
        rel = 2e-3 if "landscape/projection_trace" in tag else 1e-5
        for step in (3, 4):
            assert b[tag][step] == pytest.approx(series[step], rel=rel, abs=1e-7), (tag, step)
            compared += 1
    assert compared >= 2 * 10


def test_ngd_training_is_bitwise_identical_with_the_suite(tiny, tmp_path):
    from lightning_curvature.models import ImageClassifier

    def run(callbacks, sub):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        module = ImageClassifier(net, optimizer="ngd", lr=0.05, alpha=1.0, num_classes=3)
        t = tiny.trainer(tmp_path / sub, callbacks, max_epochs=2)
        t.fit(module, tiny.loader(tiny.make_dataset()))
        return module.state_dict(), t

    plain, _ = run([], "plain")
    measured, t = run(small_suite(), "measured")
    assert all(torch.equal(plain[k], measured[k]) for k in plain)
    logged = tiny.scalars(t.logger.log_dir)
    assert sorted(logged["ngd/kappa"]) == [1, 2] and sorted(logged["ngd/fisher_trace"]) == [1, 2]


def test_measured_in_full_precision_under_mixed_and_half_precision(tiny, tmp_path):
    def trace_at_start(precision):
        torch.manual_seed(0)
        trace = cb.HessianTrace(num_samples=64, num_matvecs=12, measure_on_train_start=True)
        t = tiny.trainer(tmp_path / precision, [trace], max_epochs=1, precision=precision)
        t.fit(tiny.Module(), tiny.loader(tiny.make_dataset()))
        return tiny.scalars(t.logger.log_dir)["curvature/trace"][0]

    full = trace_at_start("32-true")
    # mixed precision keeps float32 weights: the measurement is the float32 one, exactly
    assert trace_at_start("bf16-mixed") == full
    # true bf16 weights are measured on a float32 copy (only the bf16 rounding of w differs)
    assert trace_at_start("bf16-true") == pytest.approx(full, rel=2e-2)
