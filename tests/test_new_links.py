"""The gamma, exponential and zero-inflated negative binomial links: densities against scipy,
data-aware starts against known moments, and recovery of known truth under SVI and NUTS."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_density
from scipy import stats

from blayers import links
from blayers.layers import AdaptiveLayer, InterceptLayer
from blayers.start import TargetStats

MU = np.array([-0.3, 0.2, 1.1, 0.0])


def test_gamma_density_matches_scipy():
    y = np.array([0.5, 1.7, 3.0, 0.1])
    k = 2.5
    ll, _ = log_density(lambda: links.gamma_link(MU, y), (), {}, {"gamma_shape": k})
    ref = stats.gamma(a=k, scale=np.exp(MU) / k).logpdf(y).sum() + stats.expon.logpdf(k)
    assert_allclose(ll, ref, rtol=1e-5)


def test_exponential_density_matches_scipy():
    y = np.array([0.5, 1.7, 3.0, 0.1])
    ll, _ = log_density(lambda: links.exponential_link(MU, y), (), {}, {})
    assert_allclose(ll, stats.expon(scale=np.exp(MU)).logpdf(y).sum(), rtol=1e-5)


def test_zinb_density_matches_the_mixture():
    y = np.array([0.0, 3.0, 0.0, 7.0])
    phi, gate = 1.7, 0.3
    params = {"zinb_concentration": phi, "zinb_gate": gate}
    ll, _ = log_density(lambda: links.zinb_link(MU, y), (), {}, params)
    m = np.exp(MU)
    nb = stats.nbinom(phi, phi / (phi + m)).pmf(y)
    mixture = np.where(y == 0, gate + (1 - gate) * nb, (1 - gate) * nb)
    priors = stats.expon.logpdf(phi) + stats.beta(1, 10).logpdf(gate)
    assert_allclose(ll, np.log(mixture).sum() + priors, rtol=1e-5)


def stats_of(y):
    s = TargetStats()
    s.update(np.asarray(y))
    return s


def test_starts_read_the_moments(rng):
    y = rng.gamma(4.0, 2.5 / 4.0, 200_000)  # mean 2.5, shape 4
    g = links.link_start("gamma", stats_of(y))
    assert_allclose(g.eta, [np.log(2.5)], atol=0.01)
    assert_allclose(g.globals["gamma_shape"], 4.0, rtol=0.03)
    e = links.link_start("exponential", stats_of(rng.exponential(0.7, 200_000)))
    assert_allclose(e.eta, [np.log(0.7)], atol=0.01)
    n, mean, phi, gate = 400_000, 3.0, 2.0, 0.35
    counts = rng.negative_binomial(phi, phi / (phi + mean), n)
    y = np.where(rng.random(n) < gate, 0, counts)
    z = links.link_start("zinb", stats_of(y))
    assert_allclose(z.globals["zinb_gate"], gate, atol=0.03)
    assert_allclose(z.eta, [np.log(mean)], atol=0.05)
    assert_allclose(z.globals["zinb_concentration"], phi, rtol=0.15)


@pytest.mark.parametrize("name", ["gamma", "exponential"])
def test_score_at_the_start_is_the_derivative_of_the_log_likelihood(rng, name):
    y = rng.gamma(3.0, 1.0, 1000) + 0.1
    start = links.link_start(name, stats_of(y))
    eta = float(start.eta[0])
    params = {k: float(v) for k, v in start.globals.items()}

    def loglik(e):
        model = lambda: links.get_link(name)(jax.numpy.full(3, e), y[:3])  # noqa: E731
        return log_density(model, (), {}, params)[0]

    a, b = start.score
    assert_allclose(jax.grad(loglik)(eta), np.sum(a * y[:3] + b), rtol=1e-4)


def test_support_checks_name_the_column():
    for name in ("gamma", "exponential"):
        with pytest.raises(ValueError, match=r"'spend'.*positive reals"):
            links.check_target(name, [1.0, 0.0], column="spend")
    with pytest.raises(ValueError, match=r"'visits'.*non-negative integers"):
        links.check_target("zinb", [1.0, 2.5], column="visits")


TRUTH = {"b": 0.4, "beta": -0.6}
N = 2000


def simulate(name, rng):
    x = rng.normal(size=(N, 1)).astype(np.float32)
    mean = np.exp(TRUTH["b"] + TRUTH["beta"] * x[:, 0])
    if name == "gamma":
        y = rng.gamma(3.0, mean / 3.0)
        extra = {"gamma_shape": 3.0}
    elif name == "exponential":
        y = rng.exponential(mean)
        extra = {}
    else:
        phi, gate = 2.0, 0.3
        y = rng.negative_binomial(phi, phi / (phi + mean))
        y = np.where(rng.random(N) < gate, 0, y)
        extra = {"zinb_concentration": phi, "zinb_gate": gate}
    return x, y.astype(np.float32), extra


def regression(name):
    def model(x, y=None):
        eta = InterceptLayer()("b") + AdaptiveLayer()("x", x)
        return links.get_link(name)(eta, y)

    return model


def check(name, draws, extra):
    """The truth within 3.5 posterior sds of the posterior mean, site by site."""
    expected = {
        "InterceptLayer_b_beta": TRUTH["b"],
        "AdaptiveLayer_x_beta": TRUTH["beta"],
        **extra,
    }
    for site, truth in expected.items():
        v = np.asarray(draws[site]).reshape(len(draws[site]), -1)[:, 0]
        assert abs(v.mean() - truth) < 3.5 * v.std() + 1e-3, (name, site, v.mean(), v.std())


@pytest.mark.parametrize("name", ["gamma", "exponential", "zinb"])
def test_recovery_under_nuts(rng, name):
    x, y, extra = simulate(name, rng)
    mcmc = MCMC(NUTS(regression(name)), num_warmup=300, num_samples=400, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), x, y)
    check(name, mcmc.get_samples(), extra)


@pytest.mark.parametrize("name", ["gamma", "exponential", "zinb"])
def test_recovery_under_svi(rng, name):
    x, y, extra = simulate(name, rng)
    model = regression(name)
    guide = AutoNormal(model)
    # from AutoNormal's random start, a gamma fit at lr 0.02 is still on its way at 3,000 steps
    optim = optax.adam(optax.cosine_decay_schedule(0.05, 3000, 0.05))
    svi = SVI(model, guide, optim, Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 3000, x, y, progress_bar=False)
    draws = guide.sample_posterior(jax.random.PRNGKey(1), result.params, sample_shape=(2000,))
    check(name, draws, extra)
