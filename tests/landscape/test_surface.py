import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

from lightning_curvature.landscape import (
    HessianDirections,
    LossSurface,
    loss_surface,
    random_directions,
)


def _direct_loss(model, loss_fn, data, theta):
    """Ground truth: a copy of the model with its parameters overwritten, in eval mode."""
    clone = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta, clone.parameters())
    clone.eval()
    x, y = data
    with torch.no_grad():
        return loss_fn(clone(x), y).item()


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.grad for p in model.parameters()],
    )


def _assert_unchanged(model, snapshot):
    state, modes, grads = snapshot
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))


@pytest.mark.parametrize("vectorize", [None, True, False])
def test_centre_and_corners_match_direct_evaluation(conv_setup, vectorize):
    model, loss_fn, batches, full = conv_setup
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    snap = _snapshot(model)
    rng = torch.random.get_rng_state()
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    s = loss_surface(
        model, loss_fn, batches, dirs, extent=0.5, steps=5, vectorize=vectorize, chunk_size=4
    )
    _assert_unchanged(model, snap)
    assert torch.equal(rng, torch.random.get_rng_state())
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert s.losses.shape == (5, 5)
    assert s.center_loss == pytest.approx(_direct_loss(model, loss_fn, full, theta), rel=1e-12)
    for i, a in ((0, -0.5), (4, 0.5)):
        for j, b in ((0, -0.5), (4, 0.5)):
            expected = _direct_loss(model, loss_fn, full, theta + a * dirs[0] + b * dirs[1])
            assert s.losses[i, j] == pytest.approx(expected, rel=1e-12)
    assert s.losses[1, 3] == pytest.approx(
        _direct_loss(model, loss_fn, full, theta - 0.25 * dirs[0] + 0.25 * dirs[1]), rel=1e-12
    )
    assert s.num_forward == 25 * 3
    if vectorize is False:
        assert not s.vectorized and s.chunk_size == 1
    if vectorize is True:
        assert s.vectorized and s.chunk_size == 4


def test_float32_model_vmap_and_loop_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g))
    dirs = random_directions(model, 2, generator=g)
    a = loss_surface(model, nn.CrossEntropyLoss(), data, dirs, steps=7, vectorize=True)
    b = loss_surface(model, nn.CrossEntropyLoss(), data, dirs, steps=7, vectorize=False)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)


def test_even_steps_one_direction_and_extents(conv_setup):
    model, loss_fn, batches, full = conv_setup
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    (d,) = random_directions(model, 1, generator=torch.Generator().manual_seed(1))
    s = loss_surface(model, loss_fn, batches, [d], extent=2.0, steps=4)
    assert s.ndim == 1 and s.losses.shape == (4,)
    np.testing.assert_allclose(s.coords[0], [-2, -2 / 3, 2 / 3, 2])
    assert s.center_loss == pytest.approx(_direct_loss(model, loss_fn, full, theta), rel=1e-12)
    assert s.losses[3] == pytest.approx(_direct_loss(model, loss_fn, full, theta + 2 * d))
    assert s.direction_norms[0] == pytest.approx(d.norm().item())
    d2 = random_directions(model, 2, generator=torch.Generator().manual_seed(1))
    s2 = loss_surface(model, loss_fn, batches, d2, extent=(1.0, 0.1), steps=3)
    np.testing.assert_allclose(s2.coords[1], [-0.1, 0, 0.1])
    assert s2.labels == ("d1", "d2") and s2.eigenvalues is None


def test_dropout_in_train_mode_leaves_global_rng_alone(conv_setup):
    model, loss_fn, batches, _ = conv_setup
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    rng = torch.random.get_rng_state()
    loss_surface(model, loss_fn, batches, dirs, steps=3, eval_mode=False)
    assert torch.equal(rng, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="eval_mode"):
        loss_surface(model, loss_fn, batches, dirs, steps=3, eval_mode="yes")


def test_train_mode_evaluation_restores_mode(conv_setup):
    model, loss_fn, batches, full = conv_setup
    model.eval()
    model.drop.p = 0.0  # deterministic; train mode then means batch statistics in BN
    snap = _snapshot(model)
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    s = loss_surface(model, loss_fn, [full], dirs, steps=5, eval_mode=False)
    _assert_unchanged(model, snap)
    with pytest.raises(RuntimeError):  # what the automatic mode has to survive
        loss_surface(model, loss_fn, [full], dirs, steps=5, eval_mode=False, vectorize=True)
    _assert_unchanged(model, snap)
    clone = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = loss_fn(clone(full[0]), full[1]).item()
    assert s.center_loss == pytest.approx(expected, rel=1e-12)
    assert not s.vectorized  # BatchNorm's running-stat update cannot be vmapped: loop fallback


@pytest.mark.slow  # thread-simulated all-reduce harness races; real DDP: tests/callbacks
def test_simulated_ddp_matches_single_process(conv_setup):
    model, loss_fn, batches, full = conv_setup
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    single = loss_surface(model, loss_fn, batches, dirs, steps=3)
    shards = [batches[:1], batches[1:]]  # 10 vs 13 samples: unequal shards
    barrier = threading.Barrier(2)
    slots: dict = {}
    results: list = [None, None]

    def make_reduce(rank):
        def reduce_fn(t):
            slots[(rank, len(slots) // 2)] = t.clone()
            barrier.wait()
            key = len(slots) // 2 - 1
            total = slots[(0, key)] + slots[(1, key)]
            barrier.wait()
            return total

        return reduce_fn

    def rank_main(rank):
        results[rank] = loss_surface(
            model, loss_fn, shards[rank], dirs, steps=3, reduce_fn=make_reduce(rank)
        )

    # run sequentially-coupled ranks in threads: each reduce_fn waits for the other rank
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_allclose(r.losses, single.losses, rtol=1e-12)
        assert r.center_loss == pytest.approx(single.center_loss, rel=1e-12)


def test_save_and_load_npz(conv_setup, tmp_path):
    model, loss_fn, batches, _ = conv_setup
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    s = loss_surface(model, loss_fn, batches, dirs, steps=3, eigenvalues=(2.0, -1.0))
    s.metadata["epoch"] = 3
    path = tmp_path / "surface.npz"
    s.save_npz(path)
    t = LossSurface.load_npz(path)
    np.testing.assert_array_equal(t.losses, s.losses)
    for a, b in zip(t.coords, s.coords, strict=True):
        np.testing.assert_array_equal(a, b)
    assert t.center_loss == s.center_loss
    assert t.labels == s.labels and t.eigenvalues == (2.0, -1.0)
    assert t.direction_norms == s.direction_norms
    assert t.metadata == {"epoch": 3}


def test_slice_along_v_max_is_half_lambda_a_squared(helpers):
    model, data = helpers.trained_tanh_net(seed=0, steps=500, polish=300)
    loss_fn = nn.MSELoss()
    _, hess = helpers.flat_hessian(model, loss_fn, data)
    evals, evecs = torch.linalg.eigh(hess)
    lam, v = evals[-1].item(), evecs[:, -1]
    s = loss_surface(model, loss_fn, data, [v], extent=0.02, steps=9, eigenvalues=[lam])
    a = s.coords[0]
    rise = s.losses - s.center_loss
    even = (rise + rise[::-1]) / 2  # odd terms (the gradient's) cancel
    np.testing.assert_allclose(even, 0.5 * lam * a**2, rtol=1e-3, atol=1e-12)
    np.testing.assert_allclose(rise, 0.5 * lam * a**2, rtol=0.05, atol=1e-9)


def test_hessian_directions_object_sets_labels_and_eigenvalues(conv_setup):
    model, loss_fn, batches, _ = conv_setup
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    hd = HessianDirections(dirs[0], dirs[1], 3.0, -0.5, None)
    s = loss_surface(model, loss_fn, batches, hd, steps=3)
    assert s.labels == ("v_max", "v_min") and s.eigenvalues == (3.0, -0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 1}, "steps"),
        ({"extent": 0.0}, "extent"),
        ({"extent": (1.0,)}, "extent"),
        ({"labels": ("a",)}, "labels"),
    ],
)
def test_bad_arguments(conv_setup, kwargs, match):
    model, loss_fn, batches, _ = conv_setup
    dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        loss_surface(model, loss_fn, batches, dirs, **kwargs)


def test_bad_directions(conv_setup):
    model, loss_fn, batches, _ = conv_setup
    dirs = random_directions(model, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="1 or 2"):
        loss_surface(model, loss_fn, batches, dirs)
    with pytest.raises(ValueError, match="length"):
        loss_surface(model, loss_fn, batches, [torch.zeros(5, dtype=torch.float64)])
