"""Links: the observation sits in the data plate, scaled by N/B, with correct densities."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpy.testing import assert_allclose
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy import stats

from blayers import links
from tests.helpers import trace_sites

B, N = 6, 600

TARGETS = {
    "gaussian": np.linspace(-1, 1, B),
    "lognormal": np.linspace(0.5, 2, B),
    "student_t": np.linspace(-1, 1, B),
    "logit": np.array([0, 1, 1, 0, 1, 0.0]),
    "poisson": np.array([0, 1, 2, 3, 0, 5.0]),
    "negative_binomial": np.array([0, 1, 2, 3, 0, 5.0]),
    "ordinal": np.array([0, 1, 2, 3, 2, 1]),
    "zip": np.array([0, 0, 2, 3, 0, 1.0]),
    "beta": np.linspace(0.1, 0.9, B),
    "gamma": np.linspace(0.5, 2, B),
    "exponential": np.linspace(0.5, 2, B),
    "zinb": np.array([0, 0, 2, 3, 0, 1.0]),
}


def _call(name, mu, y, **kw):
    extra = {"num_classes": 4} if name == "ordinal" else {}
    return links.get_link(name)(mu, y, **extra, **kw)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_obs_inside_data_plate_scaled_by_n_over_b(name):
    mu = jnp.linspace(-0.5, 0.5, B)[:, None]
    y = jnp.asarray(TARGETS[name])
    trace = trace_sites(lambda: _call(name, mu, y, num_data=N))
    obs = trace["obs"]
    assert [f.name for f in obs["cond_indep_stack"]] == ["data"]
    assert obs["scale"] == pytest.approx(N / B)
    assert obs["fn"].batch_shape == (B,)
    for site in trace.values():  # globals stay outside the plate, unscaled
        if site["type"] == "sample" and site["name"] != "obs":
            assert site["cond_indep_stack"] == [] and site["scale"] is None


def test_user_plate_is_reused_for_links_without_globals():
    mu = jnp.zeros((B, 1))

    def model():
        with numpyro.plate("data", N, subsample_size=B):
            links.logit_link(mu, jnp.ones(B))

    obs = trace_sites(model)["obs"]
    assert [f.name for f in obs["cond_indep_stack"]] == ["data"]
    assert obs["scale"] == pytest.approx(N / B)


def test_global_site_inside_user_plate_is_refused():
    def model():
        with numpyro.plate("data", N, subsample_size=B):
            links.gaussian_link(jnp.zeros(B), jnp.zeros(B))

    with pytest.raises(ValueError, match=r"'sigma'.*num_data"):
        trace_sites(model)


def test_log_likelihoods_match_scipy():
    mu = np.array([-0.3, 0.2, 1.1])
    y = np.array([0.1, -0.4, 2.0])
    ll, _ = log_density(lambda: links.gaussian_link(mu, y, scale=0.7), (), {}, {})
    assert_allclose(ll, stats.norm(mu, 0.7).logpdf(y).sum(), rtol=1e-5)

    yb = np.array([1.0, 0.0, 1.0])
    ll, _ = log_density(lambda: links.logit_link(mu, yb), (), {}, {})
    p = 1 / (1 + np.exp(-mu))
    assert_allclose(ll, stats.bernoulli(p).logpmf(yb).sum(), rtol=1e-5)

    yc = np.array([0.0, 3.0, 1.0])
    ll, _ = log_density(lambda: links.poisson_link(mu, yc), (), {}, {})
    assert_allclose(ll, stats.poisson(np.exp(mu)).logpmf(yc).sum(), rtol=1e-5)

    params = {"concentration": 2.5}
    ll, _ = log_density(lambda: links.negative_binomial_link(mu, yc), (), {}, params)
    m = np.exp(mu)
    nb = stats.nbinom(2.5, 2.5 / (2.5 + m)).logpmf(yc).sum()
    assert_allclose(ll, nb + stats.expon.logpdf(2.5), rtol=1e-5)


def test_ordinal_probabilities_follow_cutpoints():
    mu = jnp.array([0.0, 2.0])
    params = {"ordinal_c0": -1.0, "ordinal_gaps": jnp.array([1.0, 1.5])}
    trace = handlers.trace(
        handlers.substitute(
            handlers.seed(lambda: links.ordinal_link(mu, None, num_classes=4), 0), params
        )
    ).get_trace()
    cut = np.array([-1.0, 0.0, 1.5])
    cdf = 1 / (1 + np.exp(-(cut[None] - np.asarray(mu)[:, None])))
    probs = np.diff(np.concatenate([np.zeros((2, 1)), cdf, np.ones((2, 1))], 1), axis=1)
    assert_allclose(trace["obs"]["fn"].probs, probs, rtol=1e-5)


def test_known_and_untransformed_scale():
    trace = trace_sites(lambda: links.gaussian_link(jnp.zeros(3), None, scale=2.0))
    assert "sigma" not in trace
    assert_allclose(trace["obs"]["fn"].scale, 2.0)
    raw = jnp.array([0.0, 1.0, -1.0])
    trace = trace_sites(lambda: links.gaussian_link(jnp.zeros(3), None, untransformed_scale=raw))
    assert_allclose(trace["obs"]["fn"].scale, np.log1p(np.exp(np.asarray(raw))), rtol=1e-6)
    hn = trace_sites(
        lambda: links.gaussian_link(
            jnp.zeros(3), None, sigma_dist=dist.HalfNormal, sigma_kwargs={"scale": 1.0}
        )
    )
    assert isinstance(hn["sigma"]["fn"], dist.HalfNormal)


def test_check_target_names_column_and_support():
    links.check_target("logit", [0, 1, 1])
    with pytest.raises(ValueError, match=r"'clicked'.*'logit'.*0 or 1"):
        links.check_target("logit", [0, 1, 3], column="clicked")
    with pytest.raises(ValueError, match="NaN"):
        links.check_target("gaussian", [0.0, np.nan])
    with pytest.raises(ValueError, match="non-negative integers"):
        links.check_target("poisson", [1.5])
    with pytest.raises(ValueError, match="unknown link 'gausian'"):
        links.get_link("gausian")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="target y has shape"):
        trace_sites(lambda: links.logit_link(jnp.zeros(3), jnp.zeros(4)))
