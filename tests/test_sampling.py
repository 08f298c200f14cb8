"""sample_prior: joint prior draws whose moments are the prior's, and an observation drawn
from the prior predictive (its variance the sum of the prior's and the noise's)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from blayers.layers import AdaptiveLayer, InterceptLayer
from blayers.links import gaussian_link
from blayers.sampling import sample_prior


def model(x, y=None):
    return gaussian_link(InterceptLayer()("b") + AdaptiveLayer()("x", x), y, scale=0.5)


def test_draws_follow_the_prior_and_the_prior_predictive(rng):
    x = np.array([[0.0], [2.0]], np.float32)
    draws = sample_prior(model, x, num_samples=20_000, seed=1)
    b = np.asarray(draws["InterceptLayer_b_beta"]).ravel()
    assert_allclose([b.mean(), b.std()], [0.0, 1.0], atol=0.03)  # Normal(0, 1)
    obs = np.asarray(draws["obs"])
    assert obs.shape == (20_000, 2)
    # at x = 0 the predictive is b + noise: variance 1 + 0.5²
    assert_allclose(obs[:, 0].var(), 1.25, rtol=0.05)
    # and each draw of obs is centred on its own draw of the linear predictor
    beta = np.asarray(draws["AdaptiveLayer_x_beta"])[:, 0, 0]
    resid = obs[:, 1] - (b + 2.0 * beta)
    assert_allclose(resid.std(), 0.5, rtol=0.05)
    again = sample_prior(model, x, num_samples=20_000, seed=1)
    assert_allclose(np.asarray(again["obs"]), obs)  # a seed gives the same draws


def test_bad_count_is_refused():
    with pytest.raises(ValueError, match="num_samples"):
        sample_prior(model, np.zeros((2, 1), np.float32), num_samples=0)
