"""``HessianTrace`` per-layer tags: logged during a fit, summing to tr H, matching H's blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import lightning_curvature.callbacks as cb
from lightning_curvature.callbacks.trace import layer_tag


def exact_block_traces(module, dataset) -> dict[str, float]:
    """tr of each parameter tensor's diagonal block of the float64 Hessian on the whole set."""
    model = copy.deepcopy(module.net).double().eval()
    x, y = dataset.tensors
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(th):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = th[i : i + s.numel()].view(s)
            i += s.numel()
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x.double(),)), y)

    hess = torch.func.hessian(loss)(theta)
    out, start = {}, 0
    for n, s in zip(names, shapes, strict=True):
        stop = start + s.numel()
        out[f"net.{n}"] = float(torch.trace(hess[start:stop, start:stop]))
        start = stop
    return out


@pytest.mark.parametrize("method", ["krylov", "hutchpp"])
def test_layer_traces_are_logged_and_match_the_hessian_blocks(tmp_path, tiny, method):
    data = tiny.make_dataset(n=96)
    module = tiny.Module()
    budget = {"num_probes": 300} if method == "krylov" else {"num_matvecs": 600}
    trace = cb.HessianTrace(
        method=method, krylov_iters=6, num_samples=None, batch_size=None, every_n_epochs=1,
        per_layer=True, **budget,
    )  # fmt: skip
    trainer = tiny.trainer(tmp_path, [trace], max_epochs=2)
    trainer.fit(module, tiny.loader(data, seed=0))
    logged = tiny.scalars(str(tmp_path))
    names = [f"net.{n}" for n, _ in module.net.named_parameters()]
    tags = [layer_tag(n) for n in names]
    assert tags[0] == "curvature/trace_layer/net/0/weight"
    for step in (1, 2):
        total = logged["curvature/trace"][step]
        parts = sum(logged[t][step] for t in tags)
        assert parts == pytest.approx(total, rel=1e-5, abs=1e-6)
    exact = exact_block_traces(module, data)
    last = trace.last_measurement.scalars
    stderr = last["curvature/trace_stderr"]
    for n, t in zip(names, tags, strict=True):
        assert abs(last[t] - exact[n]) <= 5 * stderr + 1e-4, (n, last[t], exact[n])
    assert "curvature/trace_layer" in tiny.images(str(tmp_path))


def test_per_layer_off_logs_no_layer_tags(tmp_path, tiny):
    data = tiny.make_dataset(n=64)
    trace = cb.HessianTrace(num_probes=4, krylov_iters=4, num_samples=32, every_n_epochs=1,
                            per_layer=False)  # fmt: skip
    tiny.trainer(tmp_path, [trace], max_epochs=1).fit(tiny.Module(), tiny.loader(data))
    logged = tiny.scalars(str(tmp_path))
    assert "curvature/trace" in logged
    assert not [t for t in logged if t.startswith("curvature/trace_layer")]
    assert "curvature/trace_layer" not in tiny.images(str(tmp_path))
    with pytest.raises(ValueError, match="per_layer"):
        cb.HessianTrace(per_layer="yes")
