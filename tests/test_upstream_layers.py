"""RandomSlopesLayer, AR1Layer, HorseshoeInteractionLayer and MixtureLayer (upstream 0.3.7's
names, signatures and sites): outputs and densities against brute force, and recovery of known truth
under SVI and NUTS."""

from __future__ import annotations

import warnings

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
from scipy import stats

from blayers.layers import (
    AR1Layer,
    HorseshoeInteractionLayer,
    HorseshoeLayer,
    InterceptLayer,
    MixtureLayer,
    RandomSlopesLayer,
)
from blayers.links import gaussian_link


def svi_draws(model, args, steps=3000, lr=0.03):
    guide = AutoNormal(model)
    optim = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
    result = SVI(model, guide, optim, Trace_ELBO()).run(
        jax.random.PRNGKey(0), steps, *args, progress_bar=False
    )
    return guide.sample_posterior(jax.random.PRNGKey(1), result.params, sample_shape=(2000,))


def nuts_draws(model, args):
    mcmc = MCMC(NUTS(model), num_warmup=400, num_samples=500, progress_bar=False)
    with warnings.catch_warnings():
        # warmup's long trajectories reach unconstrained values where float32's sigmoid is
        # exactly 1, i.e. rho on the edge of its open support; those proposals are rejected
        warnings.filterwarnings("ignore", "Out-of-support values", UserWarning)
        mcmc.run(jax.random.PRNGKey(0), *args)
    return mcmc.get_samples()


# ------------------------------------------------------------------------------ random slopes


def test_random_slopes_output_and_density_match_brute_force(rng):
    x = rng.normal(size=(5, 2)).astype(np.float32)
    groups = np.array([0, 2, 2, 1, 0])
    tau = np.array([[0.5, 1.0], [2.0, 0.3]], np.float32)
    beta = rng.normal(size=(3, 2, 2)).astype(np.float32)
    sites = {"RandomSlopesLayer_s_scale": tau, "RandomSlopesLayer_s_beta": beta}

    def model():
        return RandomSlopesLayer()("s", x, groups, 3, units=2)

    out = handlers.substitute(handlers.seed(model, 0), sites)()
    expected = np.stack([x[i] @ beta[groups[i]] for i in range(5)])
    assert_allclose(out, expected, rtol=1e-5)
    ll, _ = log_density(model, (), {}, sites)
    ref = stats.halfnorm.logpdf(tau).sum() + stats.norm(0, tau[None]).logpdf(beta).sum()
    assert_allclose(ll, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="RandomSlopesLayer_s_groups"):
        handlers.seed(lambda: RandomSlopesLayer()("s", x, np.array([0, 3, 1, 1, 0]), 3), 0)()
    with pytest.raises(ValueError, match="one group id per row"):
        handlers.seed(lambda: RandomSlopesLayer()("s", x, np.array([0, 1]), 3), 0)()


SLOPES = np.array([-1.2, -0.6, -0.1, 0.3, 0.8, 1.1])


def slopes_data(rng, n=1800):
    x = rng.normal(size=(n, 1)).astype(np.float32)
    g = rng.integers(0, len(SLOPES), n)
    y = (0.5 + x[:, 0] * SLOPES[g] + rng.normal(0, 0.5, n)).astype(np.float32)
    return x, g, y


def slopes_model(x, g, y=None):
    eta = InterceptLayer()("b") + RandomSlopesLayer()("s", x, g, len(SLOPES))
    return gaussian_link(eta, y)


def assert_slopes_recovered(draws):
    beta = np.asarray(draws["RandomSlopesLayer_s_beta"])[:, :, 0, 0]
    mean, sd = beta.mean(0), beta.std(0)
    assert np.all(np.abs(mean - SLOPES) < 3.5 * sd), (mean, sd)
    assert np.all(sd < 0.06)
    tau = np.asarray(draws["RandomSlopesLayer_s_scale"]).ravel()
    assert np.quantile(tau, 0.01) < SLOPES.std() < np.quantile(tau, 0.99)


@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_random_slopes_recovered(rng, method):
    args = slopes_data(rng)
    draws = nuts_draws(slopes_model, args) if method == "nuts" else svi_draws(slopes_model, args)
    assert_slopes_recovered(draws)


# --------------------------------------------------------------------------------------- AR(1)


@pytest.mark.parametrize("noncentered", [False, True])
def test_ar1_density_is_the_stationary_gaussian(noncentered):
    c, rho, sigma = 7, np.float32(0.6), np.float32(0.8)
    ids = np.arange(c)

    def model():
        return AR1Layer(noncentered=noncentered)("t", ids, c)

    lag = np.abs(np.subtract.outer(np.arange(c), np.arange(c)))
    cov = sigma**2 * rho**lag / (1 - rho**2)
    rho_prior = stats.beta(2, 2).logpdf((rho + 1) / 2) - np.log(2)
    priors = rho_prior + stats.halfnorm.logpdf(sigma)
    sites = {"AR1Layer_t_rho": jnp.array([rho]), "AR1Layer_t_scale": jnp.array([sigma])}
    if noncentered:
        z = np.random.default_rng(0).normal(size=(c, 1)).astype(np.float32)
        sites["AR1Layer_t_z"] = z
        out = handlers.substitute(handlers.seed(model, 0), sites)()
        states = [sigma / np.sqrt(1 - rho**2) * z[0, 0]]
        for t in range(1, c):
            states.append(rho * states[-1] + sigma * z[t, 0])
        assert_allclose(out[:, 0], states, rtol=1e-5)
        ll, _ = log_density(model, (), {}, sites)
        assert_allclose(ll, priors + stats.norm.logpdf(z).sum(), rtol=1e-5)
    else:
        theta = np.random.default_rng(1).normal(size=(c, 1)).astype(np.float32)
        sites["AR1Layer_t_theta"] = theta
        out = handlers.substitute(handlers.seed(model, 0), sites)()
        assert_allclose(out, theta)
        ll, _ = log_density(model, (), {}, sites)
        ref = priors + stats.multivariate_normal(np.zeros(c), cov).logpdf(theta[:, 0])
        assert_allclose(ll, ref, rtol=1e-4)


def test_ar1_rho_is_declared_on_its_interval_so_no_guide_draws_outside_it():
    # an affine map of the Beta without its domain reads as supported on the real line: a
    # guide then drew rho > 1 in about 3% of draws (a -inf log density and a skipped step)
    from numpyro.distributions import biject_to, constraints

    from blayers.guides import latent_sites

    site = latent_sites(lambda: AR1Layer()("t", np.arange(5), 5))["AR1Layer_t_rho"]
    support = site.support.base_constraint  # per unit
    assert isinstance(support, constraints.interval)
    assert (float(support.lower_bound), float(support.upper_bound)) == (-1.0, 1.0)
    rho = biject_to(site.support)(jnp.linspace(-15.0, 15.0, 101))
    assert float(rho.min()) > -1.0 and float(rho.max()) < 1.0


def test_ar1_rejects_bad_settings():
    with pytest.raises(ValueError, match="rho_concentration"):
        AR1Layer(rho_concentration=0.0)
    with pytest.raises(ValueError, match="AR1Layer_t_x"):
        handlers.seed(lambda: AR1Layer()("t", np.array([0, 5]), 5), 0)()


RHO, SIGMA, SLOTS = 0.8, 0.4, 60


def ar1_data(rng, per_slot=15):
    theta = [rng.normal(0, SIGMA / np.sqrt(1 - RHO**2))]
    for _ in range(SLOTS - 1):
        theta.append(RHO * theta[-1] + rng.normal(0, SIGMA))
    t = np.repeat(np.arange(SLOTS), per_slot)
    y = (np.asarray(theta)[t] + rng.normal(0, 0.3, len(t))).astype(np.float32)
    return t, y, np.asarray(theta)


def ar1_model(t, y=None):
    # states observed 15 times each: the centred form, whose sites the data pin one by one,
    # suits a mean-field guide (non-centred, rho and the innovations are tightly correlated)
    return gaussian_link(AR1Layer()("t", t, SLOTS), y)


@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_ar1_recovered(rng, method):
    t, y, theta = ar1_data(rng)
    if method == "nuts":
        draws = nuts_draws(ar1_model, (t, y))
    else:
        draws = svi_draws(ar1_model, (t, y), steps=4000)
    rho = np.asarray(draws["AR1Layer_t_rho"]).ravel()
    sigma = np.asarray(draws["AR1Layer_t_scale"]).ravel()
    assert abs(rho.mean() - RHO) < 3.5 * rho.std() + 0.02, (rho.mean(), rho.std())
    assert abs(sigma.mean() - SIGMA) < 3.5 * sigma.std() + 0.02, (sigma.mean(), sigma.std())
    states = np.asarray(draws["AR1Layer_t_theta"])[:, :, 0]
    err = np.abs(states.mean(0) - theta) / states.std(0)
    assert np.mean(err < 2.0) > 0.85, np.sort(err)[-5:]


# -------------------------------------------------------------------------- horseshoe's tau0


def test_horseshoe_tau0_is_the_global_scale_of_its_half_cauchy(rng):
    x = rng.normal(size=(4, 3)).astype(np.float32)
    sites = {
        "HorseshoeLayer_h_tau": np.array([0.3], np.float32),
        "HorseshoeLayer_h_scale": np.full((3, 1), 0.7, np.float32),
        "HorseshoeLayer_h_beta": rng.normal(size=(3, 1)).astype(np.float32),
    }
    ll, _ = log_density(lambda: HorseshoeLayer(tau0=0.05)("h", x), (), {}, sites)
    ref = (
        stats.halfcauchy(scale=0.05).logpdf(0.3)
        + stats.halfcauchy.logpdf(np.full(3, 0.7)).sum()
        + stats.norm(0, 0.3 * 0.7).logpdf(sites["HorseshoeLayer_h_beta"]).sum()
    )
    assert_allclose(ll, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="tau0"):
        HorseshoeLayer(tau0=0.0)


def test_a_small_tau0_shrinks_the_null_coefficients_under_nuts(rng):
    n, p = 200, 12
    x = rng.normal(size=(n, p)).astype(np.float32)
    beta = np.zeros(p)
    beta[:2] = [1.5, -1.0]
    y = (x @ beta + rng.normal(0, 1.0, n)).astype(np.float32)
    null = {}
    for tau0 in (1.0, 0.01):

        def model(x, y=None, tau0=tau0):
            return gaussian_link(HorseshoeLayer(tau0=tau0)("h", x), y)

        draws = nuts_draws(model, (x, y))
        b = np.asarray(draws["HorseshoeLayer_h_beta"])[:, :, 0]
        assert np.all(np.abs(b[:, :2].mean(0) - beta[:2]) < 3.5 * b[:, :2].std(0))
        null[tau0] = np.abs(b[:, 2:].mean(0)).mean()
    assert null[0.01] < 0.7 * null[1.0], null


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


@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_horseshoe_interactions_find_the_two_real_pairs(rng, method):
    x, y, beta = interaction_data(rng)
    if method == "nuts":
        draws = nuts_draws(interaction_model, (x, y))
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
    layer = MixtureLayer(
        component_kwargs=({"loc": 0.0, "scale": 0.1}, {"loc": 0.0, "scale": 1.0})
    )
    return gaussian_link(layer("m", x), y)


@pytest.mark.parametrize("method", ["nuts", "svi"])
def test_mixture_recovers_large_and_small_coefficients(rng, method):
    x, y, beta = mixture_data(rng)
    if method == "nuts":
        draws = nuts_draws(mixture_model, (x, y))
    else:
        draws = svi_draws(mixture_model, (x, y), steps=3000)
    b = np.asarray(draws["MixtureLayer_m_beta"])[:, :, 0]
    err = np.abs(b.mean(0) - beta) / b.std(0)
    assert np.all(np.abs(b[:, :3].mean(0) - beta[:3]) < 3.5 * b[:, :3].std(0)), b[:, :3].mean(0)
    assert np.mean(err < 2.5) >= 0.9, np.sort(err)[-5:]
    # the small ones shrink: their spread is the narrow component's, not the wide one's
    assert np.abs(b[:, 3:].mean(0)).mean() < 0.15
