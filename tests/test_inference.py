"""Layers under inference: parameter recovery with SVI, NUTS, and the subsampled ELBO."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_density

from blayers.layers import (
    AdaptiveLayer,
    EmbeddingLayer,
    FMLayer,
    InterceptLayer,
    RandomEffectsLayer,
)
from blayers.links import gaussian_link, logit_link


def fit(model, args, steps=3000, lr=0.02, seed=0):
    """Full-batch SVI with AutoNormal; returns (guide, params)."""
    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05)), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(seed), steps, *args, progress_bar=False)
    return guide, result.params


def posterior_mean(guide, params, site):
    return np.asarray(guide.median(params)[site])


def test_regression_recovers_coefficients(rng):
    n, beta = 4000, np.array([1.0, -2.0, 0.5])
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (0.3 + x @ beta + rng.normal(0, 0.5, n)).astype(np.float32)

    def model(x, y=None):
        return gaussian_link(
            InterceptLayer()(
                "b",
            )
            + AdaptiveLayer()("x", x),
            y,
        )

    guide, params = fit(model, (x, y))
    assert_allclose(posterior_mean(guide, params, "AdaptiveLayer_x_beta")[:, 0], beta, atol=0.05)
    assert_allclose(posterior_mean(guide, params, "InterceptLayer_b_beta"), [[0.3]], atol=0.05)
    assert_allclose(posterior_mean(guide, params, "sigma"), 0.5, atol=0.05)


def test_random_effects_recovers_group_effects_and_scale(rng):
    groups, n, sd = 40, 8000, 1.0
    effects = rng.normal(0, sd, groups)
    g = rng.integers(0, groups, n).astype(np.int32)
    y = (effects[g] + rng.normal(0, 0.5, n)).astype(np.float32)

    def model(g, y=None):
        return gaussian_link(RandomEffectsLayer()("g", g, groups), y)

    guide, params = fit(model, (g, y))
    est = posterior_mean(guide, params, "RandomEffectsLayer_g_theta")
    assert np.corrcoef(est, effects)[0, 1] > 0.99
    assert np.abs(est - effects).max() < 0.2
    scale = float(posterior_mean(guide, params, "RandomEffectsLayer_g_scale"))
    assert 0.7 * np.std(effects) < scale < 1.4 * np.std(effects)


def test_embedding_recovers_varying_slopes(rng):
    c, m, n = 15, 2, 6000
    table = rng.normal(0, 1.0, (c, m))
    ids = rng.integers(0, c, n).astype(np.int32)
    x = rng.normal(size=(n, m)).astype(np.float32)
    y = ((table[ids] * x).sum(1) + rng.normal(0, 0.3, n)).astype(np.float32)

    def model(ids, x, y=None):
        emb = EmbeddingLayer()("slopes", ids, c, m)
        return gaussian_link((emb * x).sum(axis=1), y)

    guide, params = fit(model, (ids, x, y))
    est = posterior_mean(guide, params, "EmbeddingLayer_slopes_theta")
    assert np.abs(est - table).max() < 0.1


def test_fm_recovers_pairwise_interactions(rng):
    d, rank, n = 5, 2, 8000
    v = rng.normal(0, 0.8, (d, rank))
    x = rng.normal(size=(n, d)).astype(np.float32)
    true_w = v @ v.T
    iu = np.triu_indices(d, 1)
    y = (np.einsum("ni,ij,nj->n", x, np.triu(true_w, 1), x) + rng.normal(0, 0.3, n)).astype(
        np.float32
    )

    def model(x, y=None):
        return gaussian_link(FMLayer()("fm", x, rank), y)

    guide, params = fit(model, (x, y), steps=4000, lr=0.03)
    theta = posterior_mean(guide, params, "FMLayer_fm_theta")[:, :, 0]
    est_w = theta @ theta.T  # identified up to rotation of the factors
    assert np.abs(est_w[iu] - true_w[iu]).max() < 0.1


def test_logistic_regression_under_nuts(rng):
    n, beta = 400, np.array([1.5, -1.0])
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ beta)))).astype(np.float32)

    def model(x, y=None):
        return logit_link(AdaptiveLayer()("x", x), y)

    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=400, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), x, y)
    draws = np.asarray(mcmc.get_samples()["AdaptiveLayer_x_beta"])[:, :, 0]
    assert draws.shape == (400, 2)
    mean, sd = draws.mean(0), draws.std(0)
    assert np.all(np.abs(mean - beta) < 3 * sd + 0.1)
    assert np.all(sd > 0.05) and np.all(sd < 0.4)


# ------------------------------------------------------------------ subsampled ELBO


N, BATCH, GROUPS = 512, 64, 10


def re_model(x, g, y=None, num_data=None):
    mu = AdaptiveLayer()("x", x) + RandomEffectsLayer()("g", g, GROUPS)
    return gaussian_link(mu, y, num_data=num_data)


@pytest.fixture
def re_data(rng):
    x = rng.normal(size=(N, 2)).astype(np.float32)
    g = rng.integers(0, GROUPS, N).astype(np.int32)
    y = x @ np.array([1.0, -1.0]) + rng.normal(0, 0.5, GROUPS)[g] + rng.normal(0, 0.3, N)
    return x, g, y.astype(np.float32)


def test_log_joint_over_an_epoch_of_batches_equals_full_data(re_data):
    x, g, y = re_data
    latent = {
        "AdaptiveLayer_x_scale": 1.3,
        "AdaptiveLayer_x_beta": jnp.array([[0.8], [-0.7]]),
        "RandomEffectsLayer_g_scale": 0.6,
        "RandomEffectsLayer_g_theta": jnp.linspace(-1, 1, 10),
        "sigma": 0.4,
    }
    full, _ = log_density(re_model, (x, g, y), {}, latent)
    seeded = handlers.seed(re_model, 0)  # the subsampling plate asks for a key it never uses
    batches = [
        log_density(
            seeded,
            (x[s : s + BATCH], g[s : s + BATCH], y[s : s + BATCH]),
            {"num_data": N},
            latent,
        )[0]
        for s in range(0, N, BATCH)
    ]
    # each batch estimate is prior + (N/B) * batch log-likelihood; averaged over a partition
    # of the data they give the full-data log joint exactly
    assert_allclose(np.mean(batches), full, rtol=1e-5)
    assert np.std(batches) > 1.0  # the batches differ; only their average is exact


def test_subsampled_elbo_is_unbiased_for_full_elbo(re_data):
    x, g, y = re_data
    guide = AutoNormal(re_model)
    svi = SVI(re_model, guide, optax.adam(0.05), Trace_ELBO())
    params = svi.run(jax.random.PRNGKey(0), 300, x, g, y, progress_bar=False).params
    elbo = Trace_ELBO()

    def full_loss(key):
        return elbo.loss(key, params, re_model, guide, x, g, y)

    def batch_loss(key, idx):
        xs, gs, ys = (jnp.asarray(a)[idx] for a in (x, g, y))
        return elbo.loss(key, params, re_model, guide, xs, gs, ys, num_data=N)

    # same guide draw (same key) for every batch of a partition: the average is exact
    key = jax.random.PRNGKey(7)
    perm = np.random.default_rng(1).permutation(N).reshape(-1, BATCH)
    epoch = np.mean([batch_loss(key, idx) for idx in perm])
    assert_allclose(epoch, full_loss(key), rtol=1e-5)

    # fresh draws and random batches: the Monte Carlo means agree within their error
    keys = jax.random.split(jax.random.PRNGKey(11), 400)
    idx = np.random.default_rng(2).integers(0, N, size=(400, BATCH))
    sub = np.asarray(jax.vmap(batch_loss)(keys, jnp.asarray(idx)))
    ful = np.asarray(jax.vmap(full_loss)(keys))
    stderr = np.sqrt(sub.var() / sub.size + ful.var() / ful.size)
    assert abs(sub.mean() - ful.mean()) < 4 * stderr
