"""One measurement per epoch: the callbacks on a Trainer read one Hessian and one Lanczos run."""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest
import torch

import lightning_curvature.callbacks as cb
from lightning_curvature import curvature
from lightning_curvature.curvature import krylov_deflated_trace as deflated_trace
from lightning_curvature.landscape import LossSurface


def _spd_with_negative(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    # A few outliers and a bulk with some negative eigenvalues, like a network Hessian.
    evals = torch.cat(
        [torch.tensor([50.0, 20.0, 8.0]), torch.randn(dim - 3, generator=g).double() * 0.5]
    )
    return (q * evals) @ q.T


def test_deflated_trace_is_exact_on_a_full_krylov_space():
    a = _spd_with_negative(30, 0)
    op = curvature.DenseOperator(a)
    run = curvature.lanczos(op, 30, generator=torch.Generator().manual_seed(1))
    est = deflated_trace(op, run, 4, torch.Generator().manual_seed(2))
    assert est.value == pytest.approx(float(torch.trace(a)), rel=1e-9, abs=1e-8)


def test_deflated_trace_is_unbiased_and_its_stderr_is_honest():
    a = _spd_with_negative(60, 3)
    exact = float(torch.trace(a))
    op = curvature.DenseOperator(a)
    values, errs = [], []
    for seed in range(200):
        run = curvature.lanczos(op, 5, generator=torch.Generator().manual_seed(10_000 + seed))
        est = deflated_trace(op, run, 6, torch.Generator().manual_seed(seed))
        values.append(est.value)
        errs.append(est.stderr)
    values = np.asarray(values)
    # Unbiased: the mean of 200 estimates is within 4 standard errors of that mean.
    assert abs(values.mean() - exact) < 4 * values.std(ddof=1) / math.sqrt(len(values))
    # The reported stderr matches the spread of the estimates (within 30%).
    assert np.mean(errs) == pytest.approx(values.std(ddof=1), rel=0.3)
    # Deflation pays: plain Hutchinson with the same 11 products spreads far more.
    plain = [
        curvature.hutchinson_trace(op, 11, generator=torch.Generator().manual_seed(s)).value
        for s in range(200)
    ]
    assert values.std() < 0.5 * np.std(plain)


def _suite(**shared):
    shared = {"num_samples": 64, "batch_size": 32, "every_n_epochs": 1, **shared}
    return [
        cb.HessianTrace(num_probes=6, krylov_iters=4, **shared),
        cb.HessianEigenvalues(max_iters=12, **shared),
        cb.LossProjection(
            steps=5, num_random_projections=2, num_trace_directions=2, max_iters=8, **shared
        ),
    ]


def test_one_epoch_one_lanczos_run_for_every_reader(tiny, tmp_path, monkeypatch):
    runs = []
    original = curvature.lanczos

    def counting(*args, **kwargs):
        runs.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(curvature, "lanczos", counting)
    torch.manual_seed(0)
    t = tiny.trainer(tmp_path, _suite(), max_epochs=2)
    t.fit(tiny.Module(), tiny.loader(tiny.make_dataset()))
    # one run per epoch, with the largest budget any reader asked for (12, not 8)
    assert runs == [12, 12]
    logged = tiny.scalars(t.logger.log_dir)
    # the landscape's Hessian directions are the logged eigenpairs of the same epoch
    for step in (1, 2):
        (path,) = glob.glob(
            os.path.join(t.logger.log_dir, "landscape", f"hessian_epoch{step:04d}.npz")
        )
        surface = LossSurface.load_npz(path)
        assert surface.eigenvalues[0] == pytest.approx(logged["curvature/lambda_max"][step])
        assert surface.eigenvalues[1] == pytest.approx(logged["curvature/lambda_min"][step])


def test_results_do_not_depend_on_the_order_of_the_callbacks(tiny, tmp_path):
    def run(order, sub):
        torch.manual_seed(0)
        suite = _suite()
        t = tiny.trainer(tmp_path / sub, [suite[i] for i in order], max_epochs=2)
        t.fit(tiny.Module(), tiny.loader(tiny.make_dataset(), shuffle=False))
        return tiny.scalars(t.logger.log_dir)

    a, b = run((0, 1, 2), "a"), run((2, 1, 0), "b")
    for tag in ("curvature/trace", "curvature/lambda_max", "curvature/lambda_min"):
        for step, v in a[tag].items():
            assert b[tag][step] == pytest.approx(v, rel=1e-6), (tag, step)


def test_different_measurement_sets_do_not_share(tiny, tmp_path):
    torch.manual_seed(0)
    small = cb.HessianEigenvalues(num_samples=32, every_n_epochs=1, max_iters=30)
    big = cb.HessianEigenvalues(num_samples=96, every_n_epochs=1, max_iters=30, name="big")
    t = tiny.trainer(tmp_path, [small, big], max_epochs=1)
    t.fit(tiny.Module(), tiny.loader(tiny.make_dataset()))
    logged = tiny.scalars(t.logger.log_dir)
    assert logged["curvature/lambda_max"][1] != logged["curvature/lambda_max/big"][1]
    assert "time/HessianEigenvalues/big" in logged
    assert small.state_key != big.state_key
