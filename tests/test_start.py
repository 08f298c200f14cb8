"""blayers/start.py, data-aware starts: streaming target moments, each link's moment
estimates on data with a known truth and each link's score at the start (the service's use of
them: tests/test_starts.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose
from numpyro import handlers

from blayers import links
from blayers.links import link_start
from blayers.start import CategorySums, TargetStats


def stats_of(y: np.ndarray, pieces: int = 3) -> TargetStats:
    stats = TargetStats()
    for part in np.array_split(y, pieces):
        stats.update(part)
    return stats


def test_streaming_moments_equal_the_whole_array(rng):
    y = rng.poisson(3.0, 10_001).astype(np.float32)
    s = stats_of(y, 7)
    assert s.count == y.size
    assert_allclose(s.mean, y.mean(), rtol=1e-6)
    assert_allclose(s.var, y.var(), rtol=1e-5)
    pos = y[y > 0].astype(np.float64)
    assert_allclose(s.log_mean, np.log(pos).mean(), rtol=1e-6)
    assert_allclose(s.log_sd, np.log(pos).std(), rtol=1e-5)
    assert s.classes == np.bincount(y.astype(int)).tolist()
    assert s.zeros == int((y == 0).sum())
    again = TargetStats.from_dict(s.to_dict())
    assert again == s
    s.update(np.array([0.5]))  # not an integer: no histogram from here on
    assert s.classes is None


def test_gaussian_and_lognormal_start_at_mean_and_sd(rng):
    y = rng.normal(3.2, 7.0, 20_000)
    start = link_start("gaussian", stats_of(y))
    assert_allclose(start.eta, [3.2], atol=0.15)
    assert_allclose(start.globals["sigma"], 7.0, rtol=0.02)
    start = link_start("lognormal", stats_of(np.exp(y / 7.0)))
    assert_allclose(start.eta, [3.2 / 7.0], atol=0.02)
    assert_allclose(start.globals["sigma"], 1.0, rtol=0.02)
    t = link_start("student_t", stats_of(y), {"df": 4.0})
    assert_allclose(t.globals["sigma"], 7.0 * math.sqrt(0.5), rtol=0.02)


def test_count_and_binary_links_start_at_their_moment_estimates(rng):
    n = 50_000
    assert_allclose(
        link_start("logit", stats_of(rng.random(n) < 0.2)).eta, [math.log(0.25)], atol=0.03
    )
    assert_allclose(
        link_start("poisson", stats_of(rng.poisson(4.0, n))).eta, [math.log(4.0)], atol=0.01
    )
    # NegativeBinomial2(mean 5, concentration 2): a Poisson-Gamma mixture
    lam = rng.gamma(2.0, 5.0 / 2.0, n)
    nb = link_start("negative_binomial", stats_of(rng.poisson(lam)))
    assert_allclose(nb.eta, [math.log(5.0)], atol=0.02)
    assert_allclose(nb.globals["concentration"], 2.0, rtol=0.1)
    # zero-inflated Poisson: gate 0.3, rate 4
    zip_y = np.where(rng.random(n) < 0.3, 0, rng.poisson(4.0, n))
    z = link_start("zip", stats_of(zip_y))
    assert_allclose(z.eta, [math.log(4.0)], atol=0.03)
    assert_allclose(z.globals["zip_gate"], 0.3, atol=0.02)
    # Beta(mean 0.3, precision 10)
    b = link_start("beta", stats_of(rng.beta(3.0, 7.0, n)))
    assert_allclose(b.eta, [math.log(0.3 / 0.7)], atol=0.02)
    assert_allclose(b.globals["beta_phi"], 10.0, rtol=0.05)


def test_ordinal_cutpoints_and_categorical_logits_from_class_frequencies(rng):
    cuts = np.array([-1.0, 0.5, 2.0])
    latent = rng.logistic(size=100_000)
    y = (latent[:, None] > cuts[None, :]).sum(1)
    start = link_start("ordinal", stats_of(y), {"num_classes": 4})
    assert start.eta == (0.0,)
    assert_allclose(start.globals["ordinal_c0"], cuts[0], atol=0.03)
    assert_allclose(start.globals["ordinal_gaps"], np.diff(cuts), atol=0.05)
    probs = np.array([0.5, 0.3, 0.2])
    cat = link_start("categorical", stats_of(rng.choice(3, 60_000, p=probs)))
    logp = np.log(probs)
    assert_allclose(cat.eta, logp - logp.mean(), atol=0.03)


@pytest.mark.parametrize("link", ["gaussian", "logit", "poisson", "negative_binomial"])
def test_score_is_the_likelihoods_slope_at_the_start(rng, link):
    n = 400
    y = {
        "gaussian": rng.normal(3.0, 2.0, n),
        "logit": (rng.random(n) < 0.3).astype(float),
        "poisson": rng.poisson(4.0, n).astype(float),
        "negative_binomial": rng.poisson(rng.gamma(2.0, 2.5, n)).astype(float),
    }[link]
    start = link_start(link, stats_of(y))
    fn = links.get_link(link)

    def loglik(eta):
        model = handlers.substitute(lambda: fn(eta, jnp.asarray(y)), data=start.globals)
        site = handlers.trace(model).get_trace()["obs"]
        return site["fn"].log_prob(site["value"]).sum()

    slope = jax.grad(loglik)(jnp.full(n, start.eta[0], jnp.float32))
    a, b = start.score
    assert_allclose(np.asarray(slope), a * y + b, rtol=1e-4, atol=1e-4)
    assert link_start("ordinal", stats_of(np.arange(n) % 3)).score is None


def test_category_sums_stream_equal_brute_force(rng):
    ids = np.stack([rng.integers(-1, 7, 500), rng.integers(0, 3, 500)], axis=1)
    y = rng.normal(size=500)
    sums = CategorySums({"a": 7, "b": 3})
    for part in np.array_split(np.arange(500), 4):
        sums.update(["a", "b"], ids[part], y[part])
    for j, c in enumerate("ab"):
        want = [y[ids[:, j] == r].sum() for r in range(len(sums.sums[c]))]
        assert_allclose(sums.sums[c], want, rtol=1e-12, atol=1e-12)
