"""``HessianDecomposition``: traces of H, GGN and H − GGN against materialized matrices; figure."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import lightning_curvature.callbacks as cb
from lightning_curvature.callbacks.base import MeasurementError

PREFIX = "curvature/decomposition"


def exact_h_and_ggn(module, dataset):
    """float64 Hessian and GGN of the mean cross-entropy on the whole set (no engine code)."""
    model = copy.deepcopy(module.net).double().eval()
    x, y = dataset.tensors
    x = x.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(th):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = th[i : i + s.numel()].view(s)
            i += s.numel()
        return functional_call(model, params, (x,))

    def ce(out):
        return nn.functional.cross_entropy(out, y)

    hess = torch.func.hessian(lambda th: ce(outputs(th)))(theta)
    out = outputs(theta).detach()
    jac = torch.func.jacrev(outputs)(theta).reshape(-1, theta.numel())
    hl = torch.func.hessian(lambda z: ce(z.view_as(out)))(out.reshape(-1))
    return hess, jac.T @ hl @ jac


def test_traces_match_materialized_h_and_ggn_and_the_figure_is_logged(tmp_path, tiny):
    data = tiny.make_dataset(n=96)
    module = tiny.Module()
    dim = sum(p.numel() for p in module.parameters())
    dec = cb.HessianDecomposition(
        num_iters=dim, num_runs=2, trace_matvecs=3 * dim + 3, num_points=64,
        num_samples=None, batch_size=None, every_n_epochs=1,
    )  # fmt: skip
    tiny.trainer(tmp_path, [dec], max_epochs=2).fit(module, tiny.loader(data, seed=0))
    logged = tiny.scalars(str(tmp_path))
    for step in (1, 2):
        h, g, r = (logged[f"{PREFIX}/trace_{p}"][step] for p in ("h", "ggn", "residual"))
        assert h == pytest.approx(g + r, rel=1e-5, abs=1e-6)
    hess, ggn = exact_h_and_ggn(module, data)
    last = dec.last_measurement.scalars
    for part, mat in (("h", hess), ("ggn", ggn), ("residual", hess - ggn)):
        # the sketch spans the whole space: the traces are exact up to float32 products
        assert last[f"{PREFIX}/trace_{part}"] == pytest.approx(
            float(torch.trace(mat)), rel=1e-3, abs=1e-4
        )
    eigs = torch.linalg.eigvalsh(hess)
    assert last[f"{PREFIX}/index_h"] == pytest.approx(float((eigs < -1e-4).double().mean()),
                                                      abs=0.05)  # fmt: skip
    assert 0 <= last[f"{PREFIX}/index_residual"] <= 1
    assert "curvature/spectrum_decomposition" in tiny.images(str(tmp_path))
    assert "time/HessianDecomposition" in logged


def test_named_instance_small_budget_and_bad_arguments(tmp_path, tiny):
    data = tiny.make_dataset(n=64)
    dec = cb.HessianDecomposition(num_iters=6, trace_matvecs=9, num_points=32, num_samples=32,
                                  every_n_epochs=1, name="small")  # fmt: skip
    tiny.trainer(tmp_path, [dec], max_epochs=1).fit(tiny.Module(), tiny.loader(data))
    logged = tiny.scalars(str(tmp_path))
    assert f"{PREFIX}/trace_ggn/small" in logged and f"{PREFIX}/trace_ggn" not in logged
    assert logged[f"{PREFIX}/trace_ggn/small"][1] > 0  # GGN of cross-entropy: PSD
    assert "curvature/spectrum_decomposition/small" in tiny.images(str(tmp_path))
    for bad in ({"num_iters": 1}, {"trace_matvecs": 3}, {"sigma": 0.0}, {"num_runs": "2"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cb.HessianDecomposition(**bad)


def test_a_model_without_one_output_tensor_is_refused_at_setup(tmp_path, tiny):
    class TupleOutput(tiny.Module):
        def forward(self, x):
            return self.net(x), None

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x)[0], y)

    data = tiny.make_dataset(n=64)
    dec = cb.HessianDecomposition(
        num_iters=4, trace_matvecs=6, num_samples=32,
        loss_fn=lambda out, y: nn.functional.cross_entropy(out[0], y),
    )  # fmt: skip
    with pytest.raises(MeasurementError, match="one tensor"):
        tiny.trainer(tmp_path, [dec], max_epochs=1).fit(TupleOutput(), tiny.loader(data))
