"""HorseshoeInteractionLayer and MixtureLayer (upstream 0.3.7's names, signatures and sites):
outputs and densities against brute force, and recovery of known truth under SVI and NUTS."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy import stats

from blayers.layers import HorseshoeInteractionLayer, MixtureLayer
from blayers.links import gaussian_link
from tests.helpers import nuts_draws, svi_draws

# ------------------------------------------------------------------- horseshoe interactions


def test_horseshoe_interactions_match_brute_force(rng):
    x = rng.normal(size=(6, 4)).astype(np.float32)
    z = rng.normal(size=(6, 2)).astype(np.float32)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]  # 6, row-major upper triangle
    beta = rng.normal(size=(len(pairs), 1)).astype(np.float32)
    sites = {
        "HorseshoeInteractionLayer_h_tau": np.array([0.4], np.float32),
        "HorseshoeInteractionLayer_h_scale": np.full((len(pairs), 1), 0.9, np.float32),
        "HorseshoeInteractionLayer_h_beta": beta,
    }

    def within():
        return HorseshoeInteractionLayer()("h", x)

    out = handlers.substitute(handlers.seed(within, 0), sites)()
    expected = [
        sum(x[n, i] * x[n, j] * beta[k, 0] for k, (i, j) in enumerate(pairs)) for n in range(6)
    ]
    assert_allclose(out[:, 0], expected, rtol=1e-5)
    ll, _ = log_density(within, (), {}, sites)
    ref = (
        stats.halfcauchy.logpdf(0.4)
        + stats.halfcauchy.logpdf(np.full(len(pairs), 0.9)).sum()
        + stats.norm(0, 0.4 * 0.9).logpdf(beta).sum()
    )
    assert_allclose(ll, ref, rtol=1e-5)

    cross_beta = rng.normal(size=(8, 1)).astype(np.float32)
    cross_sites = {
        **sites,
        "HorseshoeInteractionLayer_h_scale": np.full((8, 1), 0.9, np.float32),
        "HorseshoeInteractionLayer_h_beta": cross_beta,
    }
    cross = handlers.substitute(
        handlers.seed(lambda: HorseshoeInteractionLayer()("h", x, z), 0), cross_sites
    )()
    expected = [
        sum(x[n, i] * z[n, j] * cross_beta[i * 2 + j, 0] for i in range(4) for j in range(2))
        for n in range(6)
    ]
    assert_allclose(cross[:, 0], expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"HorseshoeInteractionLayer_h_x.*at least 2 columns"):
        handlers.seed(lambda: HorseshoeInteractionLayer()("h", x[:, :1]), 0)()


def interaction_data(rng, n=300):
    x = rng.normal(size=(n, 5)).astype(np.float32)
    i, j = np.triu_indices(5, 1)
    beta = np.zeros(len(i))
    beta[[0, 8]] = [1.2, -0.8]  # pairs (0, 1) and (2, 4)
    y = ((x[:, i] * x[:, j]) @ beta + rng.normal(0, 0.5, n)).astype(np.float32)
    return x, y, beta


def interaction_model(x, y=None):
    return gaussian_link(HorseshoeInteractionLayer(tau0=0.1)("h", x), y)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_horseshoe_interactions_find_the_two_real_pairs(rng, method):
    x, y, beta = interaction_data(rng)
    if method == "nuts":
        draws = nuts_draws(interaction_model, (x, y), 300, 300)
    else:
        draws = svi_draws(interaction_model, (x, y), steps=4000, lr=0.02)
    b = np.asarray(draws["HorseshoeInteractionLayer_h_beta"])[:, :, 0]
    real = beta != 0
    assert np.all(np.abs(b[:, real].mean(0) - beta[real]) < 3.5 * b[:, real].std(0) + 0.05)
    assert np.abs(b[:, ~real].mean(0)).max() < 0.1, b[:, ~real].mean(0)


# ---------------------------------------------------------------------- mixture of priors


def test_mixture_density_and_output_match_brute_force(rng):
    x = rng.normal(size=(5, 3)).astype(np.float32)
    beta = np.array([[0.3], [-1.2], [2.0]], np.float32)
    logits = np.array([0.5, -0.5], np.float32)
    sites = {"MixtureLayer_m_logits": logits, "MixtureLayer_m_beta": beta}

    def model():
        return MixtureLayer(weight_scale=2.0)("m", x)

    out = handlers.substitute(handlers.seed(model, 0), sites)()
    assert_allclose(out, x @ beta, rtol=1e-5)
    ll, _ = log_density(model, (), {}, sites)
    w = np.exp(logits) / np.exp(logits).sum()
    mix = w[0] * stats.norm.pdf(beta) + w[1] * stats.laplace.pdf(beta)
    assert_allclose(ll, stats.norm(0, 2.0).logpdf(logits).sum() + np.log(mix).sum(), rtol=1e-5)

    def fixed():
        return MixtureLayer(weights=[0.25, 0.75])("m", x)

    ll, _ = log_density(fixed, (), {}, {"MixtureLayer_m_beta": beta})
    mix = 0.25 * stats.norm.pdf(beta) + 0.75 * stats.laplace.pdf(beta)
    assert_allclose(ll, np.log(mix).sum(), rtol=1e-5)


def test_mixture_rejects_bad_settings():
    import numpyro.distributions as dist

    with pytest.raises(ValueError, match="at least two"):
        MixtureLayer(component_dists=(dist.Normal,), component_kwargs=({"scale": 1.0},))
    with pytest.raises(ValueError, match="summing to 1"):
        MixtureLayer(weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="not on the real line"):
        MixtureLayer(
            component_dists=(dist.Normal, dist.HalfNormal),
            component_kwargs=({"scale": 1.0}, {"scale": 1.0}),
        )
    with pytest.raises(TypeError):
        MixtureLayer(component_kwargs=({"loc": 0.0, "scale": 1.0}, {"rate": 1.0}))


def mixture_data(rng, n=200, d=30):
    x = rng.normal(size=(n, d)).astype(np.float32)
    beta = rng.normal(0, 0.1, d)
    beta[:3] = [2.5, -2.0, 3.0]  # a few large ones in a sea of small ones
    y = (x @ beta + rng.normal(0, 1.0, n)).astype(np.float32)
    return x, y, beta


def mixture_model(x, y=None):
    layer = MixtureLayer(component_kwargs=({"loc": 0.0, "scale": 0.1}, {"loc": 0.0, "scale": 1.0}))
    return gaussian_link(layer("m", x), y)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_mixture_recovers_large_and_small_coefficients(rng, method):
    x, y, beta = mixture_data(rng)
    if method == "nuts":
        draws = nuts_draws(mixture_model, (x, y), 300, 300)
    else:
        draws = svi_draws(mixture_model, (x, y), steps=3000)
    b = np.asarray(draws["MixtureLayer_m_beta"])[:, :, 0]
    err = np.abs(b.mean(0) - beta) / b.std(0)
    assert np.all(np.abs(b[:, :3].mean(0) - beta[:3]) < 3.5 * b[:, :3].std(0)), b[:, :3].mean(0)
    assert np.mean(err < 2.5) >= 0.9, np.sort(err)[-5:]
    # the small ones shrink: their spread is the narrow component's, not the wide one's
    assert np.abs(b[:, 3:].mean(0)).mean() < 0.15
