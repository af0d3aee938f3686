import pytest
import torch
from torch import nn

from lightning_curvature.landscape import random_directions


def _blocks(model, vec):
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = vec[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    assert offset == vec.numel()
    return out


def test_filter_normalization_rows_match_weight_rows(conv_setup):
    model = conv_setup[0]
    dirs = random_directions(model, 3, generator=torch.Generator().manual_seed(0))
    assert len(dirs) == 3
    for d in dirs:
        blocks = _blocks(model, d)
        for name, w in model.named_parameters():
            w = w.detach()
            if w.dim() > 1:
                ratio = blocks[name].reshape(w.shape[0], -1).norm(dim=1) / w.reshape(
                    w.shape[0], -1
                ).norm(dim=1)
                torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-12, atol=0)
            else:  # biasbn: 1-D parameters (biases, BN weight/bias) do not move
                assert torch.count_nonzero(blocks[name]) == 0


def test_one_d_parameters_normalized_as_a_block_when_not_ignored(conv_setup):
    model = conv_setup[0]
    (d,) = random_directions(model, 1, ignore=None, generator=torch.Generator().manual_seed(0))
    blocks = _blocks(model, d)
    for name, w in model.named_parameters():
        w = w.detach()
        if w.dim() == 1 and w.norm() == 0:  # e.g. BN bias at init: zero norm, zero direction
            assert torch.count_nonzero(blocks[name]) == 0
        elif w.dim() == 1:
            assert (blocks[name].norm() / w.norm()).item() == pytest.approx(1.0, rel=1e-12)
            # still random: not a copy of the weights
            assert not torch.allclose(blocks[name].abs(), w.abs())


def test_layer_normalization(conv_setup):
    model = conv_setup[0]
    (d,) = random_directions(model, 1, normalization="layer", generator=torch.Generator())
    blocks = _blocks(model, d)
    for name, w in model.named_parameters():
        w = w.detach()
        if w.dim() > 1:
            assert (blocks[name].norm() / w.norm()).item() == pytest.approx(1.0, rel=1e-12)
            rows = blocks[name].reshape(w.shape[0], -1).norm(dim=1)
            assert not torch.allclose(rows / w.reshape(w.shape[0], -1).norm(dim=1), rows * 0 + 1)
        else:
            assert torch.count_nonzero(blocks[name]) == 0


def test_no_normalization_is_the_raw_gaussian_in_parameter_order(conv_setup):
    model = conv_setup[0]
    d1, d2 = random_directions(
        model, 2, normalization=None, generator=torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    expected = []
    for _ in range(2):
        expected.append(
            torch.cat(
                [
                    torch.randn(p.shape, generator=g, dtype=p.dtype).reshape(-1)
                    for p in model.parameters()
                ]
            )
        )
    torch.testing.assert_close(d1, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(d2, expected[1], rtol=0, atol=0)


def test_orthogonalize_keeps_norms(conv_setup):
    model = conv_setup[0]
    plain = random_directions(model, 3, generator=torch.Generator().manual_seed(2))
    ortho = random_directions(
        model, 3, orthogonalize=True, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(ortho[0], plain[0])
    for i in range(3):
        assert ortho[i].norm() == pytest.approx(plain[i].norm().item(), rel=1e-10)
        for j in range(i):
            assert abs(ortho[i] @ ortho[j]) < 1e-10 * ortho[i].norm() * ortho[j].norm()


def test_reproducible_and_side_effect_free(conv_setup):
    model = conv_setup[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    a = random_directions(model, 2, generator=torch.Generator().manual_seed(9))
    b = random_directions(model, 2, generator=torch.Generator().manual_seed(9))
    c = random_directions(model, 2, generator=torch.Generator().manual_seed(10))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert torch.equal(rng, torch.random.get_rng_state())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    assert a[0].dtype == torch.float64
    random_directions(model, 2)  # generator=None: fresh seed, still not the global RNG
    assert torch.equal(rng, torch.random.get_rng_state())
    seeded = random_directions(model, 2, generator=9)
    assert torch.equal(seeded[1], a[1])


def test_parameter_subset_and_frozen_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    (d,) = random_directions(model, 1, generator=torch.Generator())
    assert d.numel() == 4 + 8 + 2
    (d,) = random_directions(model, 1, params=["1.weight"], generator=torch.Generator())
    assert d.numel() == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num": 0}, "num"),
        ({"normalization": "unit"}, "normalization"),
        ({"ignore": "bias"}, "ignore"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_directions(nn.Linear(2, 2), **kwargs)
