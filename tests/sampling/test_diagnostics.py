"""Split R-hat and the runaway threshold on hand-checkable inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_curvature.sampling import divergence_threshold, split_r_hat


def test_split_r_hat_by_hand():
    # Halves [0,1], [2,3], [0,1], [2,3]: W = 1/2, var(means) = 4/3, L = 2,
    # R = sqrt((1/2 * 1/2 + 4/3) / (1/2)).
    x = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    assert split_r_hat(x) == pytest.approx(math.sqrt((0.25 + 4 / 3) / 0.5))


def test_split_r_hat_is_one_for_stationary_chains_and_flags_drift_and_disagreement():
    rng = np.random.default_rng(0)
    iid = rng.standard_normal((4, 2000))
    assert split_r_hat(iid) == pytest.approx(1.0, abs=0.01)
    shifted = iid + np.arange(4)[:, None]
    assert split_r_hat(shifted) > 1.5
    trending = iid + np.linspace(0.0, 2.0, 2000)[None, :]  # still climbing: no burn-in
    assert split_r_hat(trending) > 1.1
    # With one chain, splitting still detects a trend.
    assert split_r_hat(trending[:1]) > 1.1


def test_split_r_hat_undefined_cases():
    assert math.isnan(split_r_hat(np.zeros((3, 3))))
    assert math.isnan(split_r_hat(np.ones((2, 100))))
    with pytest.raises(ValueError, match="2-D"):
        split_r_hat(np.zeros(10))


def test_divergence_threshold_formula():
    t = divergence_threshold(0.5, dim=100, nbeta=10.0, minibatch_loss_std=0.01)
    assert t == pytest.approx(0.5 + 100 * (50 + 10) / 10.0 + 0.1)
    with pytest.raises(ValueError, match="runaway_factor"):
        divergence_threshold(0.5, dim=1, nbeta=1.0, runaway_factor=0.0)


def test_geweke_z_is_standard_normal_when_stationary_and_large_for_a_climb():
    from lightning_curvature.sampling import geweke_z

    rng = np.random.default_rng(1)
    zs = [geweke_z(rng.standard_normal((4, 400))) for _ in range(200)]
    assert abs(np.mean(zs)) < 0.3 and 0.7 < np.std(zs) < 1.5
    # A loss that climbs for the first 10% of the draws (no burn-in) and then plateaus.
    climb = np.minimum(np.arange(400) / 40, 1.0)[None, :]
    assert geweke_z(rng.standard_normal((4, 400)) + climb) > 3  # GEWEKE_THRESHOLD
    assert np.isnan(geweke_z(np.zeros((2, 20))))
    with pytest.raises(ValueError, match="fractions"):
        geweke_z(np.zeros((2, 100)), first=0.6, last=0.6)
