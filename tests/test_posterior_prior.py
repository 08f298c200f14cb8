"""The previous posterior as prior (blayers.posterior_prior) against exact inference.

On a conjugate gaussian model (intercept, coefficients and a table of category effects under
fixed Normal priors, noise sd known) the posterior after day 1 is an exact multivariate
Normal, and the structured guide with rows tied to the globals holds it exactly. With that
guide as the prior, day 2's negative ELBO must equal the negative ELBO of days 1 and 2
together plus log p(y_1), for every guide parameter and every draw, and so must its gradient
(zero difference). The guides' densities at arbitrary points are checked against their own
draws' log q for all three families, and against a brute-force multivariate Normal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import multivariate_normal

from blayers import guides, posterior_prior
from blayers.layers import FixedEffectsLayer, FixedPriorLayer, InterceptLayer, RandomEffectsLayer
from blayers.links import gaussian_link

SIGMA, D_X, C = 0.7, 2, 6
TABLE = "FixedEffectsLayer_g_theta"


def conjugate_model(x, g, y=None):
    mu = InterceptLayer()("b") + FixedPriorLayer()("x", x) + FixedEffectsLayer()("g", g, C)
    return gaussian_link(mu, y, scale=SIGMA)


def hierarchical_model(x, g, y=None):
    mu = InterceptLayer()("b") + FixedPriorLayer()("x", x) + RandomEffectsLayer()("g", g, C)
    return gaussian_link(mu, y)


def day(seed: int, n: int, known_categories: int = C) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_X)).astype(np.float32)
    g = rng.integers(0, known_categories, n).astype(np.int32)
    effects = np.linspace(-1.0, 1.0, C)
    y = 0.5 + x @ np.array([0.8, -0.4]) + effects[g] + SIGMA * rng.normal(size=n)
    return jnp.asarray(x), jnp.asarray(g), jnp.asarray(y.astype(np.float32))


def structured(model, data) -> guides.StructuredGuide:
    sites = guides.latent_sites(model, *data)
    return guides.make_guide("structured", sites, coupled=[TABLE])


def design(guide: guides.StructuredGuide, x: jax.Array, g: jax.Array) -> np.ndarray:
    """Columns in the guide's order: each global's elements (g), then the table's rows."""
    columns = {
        "FixedPriorLayer_x_beta": np.asarray(x, np.float64),
        "InterceptLayer_b_beta": np.ones((len(x), 1)),
    }
    table = np.eye(C)[np.asarray(g)]
    return np.concatenate([*(columns[n] for n in guide.globals), table], axis=1)


def exact_posterior(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance under N(0, I) priors and noise sd SIGMA."""
    precision = np.eye(z.shape[1]) + z.T @ z / SIGMA**2
    cov = np.linalg.inv(precision)
    return cov @ z.T @ y / SIGMA**2, cov


def log_evidence(z: np.ndarray, y: np.ndarray) -> float:
    cov = z @ z.T + SIGMA**2 * np.eye(len(y))
    return float(multivariate_normal(np.zeros(len(y)), cov).logpdf(y))


def inv_softplus(x: np.ndarray) -> np.ndarray:
    return np.log(np.expm1(x))


def guide_params(guide: guides.StructuredGuide, mean: np.ndarray, cov: np.ndarray) -> dict:
    """Structured-guide parameters that hold N(mean, cov) exactly: the globals' Cholesky
    factor, and each row's regression on the globals with its conditional sd."""
    d = guide.dim
    chol = np.linalg.cholesky(cov[:d, :d])
    params = {}
    for name in guide.globals:
        o = guide.offsets[name]
        shape = guide.sites[name].unconstrained_shape
        k = int(np.prod(shape))
        params[name] = {
            "loc": mean[o : o + k].reshape(shape),
            "raw_scale": inv_softplus(np.diag(chol)[o : o + k]).reshape(shape),
            "coupling": chol[o : o + k].reshape((*shape, d)),
        }
    gain = cov[d:, :d] @ np.linalg.inv(cov[:d, :d])
    cond = np.diag(cov[d:, d:] - gain @ cov[:d, d:])
    params[TABLE] = {
        "loc": mean[d:].reshape(C, 1),
        "raw_scale": inv_softplus(np.sqrt(cond)).reshape(C, 1),
        "coupling": gain[:, guide.row_index[TABLE]].reshape(C, 1, -1),
    }
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def perturbed(params: dict, seed: int) -> dict:
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )


def two_days_with_the_exact_prior(first: int, second: int) -> tuple:
    """Day 1 (40 rows), day 2 (30), both, the structured guide, and day 1's exact posterior
    as its prior."""
    day1, day2 = day(first, 40), day(second, 30)
    both = tuple(jnp.concatenate([a, b]) for a, b in zip(day1, day2, strict=True))
    guide = structured(conjugate_model, day1)
    mean, cov = exact_posterior(design(guide, *day1[:2]), np.asarray(day1[2], np.float64))
    prior = posterior_prior.PosteriorPrior(guide, guide_params(guide, mean, cov))
    return day1, day2, both, guide, prior


def test_exact_day1_posterior_as_prior_is_the_joint_objective() -> None:
    """-ELBO_2(q) with p(z | y_1) as prior = -ELBO_{1+2}(q) + log p(y_1), for any q and draw,
    and the gradients agree: fitting day 2 this way is fitting both days."""
    day1, day2, both, guide, prior = two_days_with_the_exact_prior(0, 1)
    evidence = log_evidence(design(guide, *day1[:2]), np.asarray(day1[2], np.float64))

    def day2_loss(p, key):
        return posterior_prior.elbo_loss(key, p, guide, conjugate_model, prior, *day2)

    def joint_loss(p, key):
        return guides.elbo_loss(key, p, guide, conjugate_model, *both)

    start = guide.init_params()
    for seed in range(4):
        params, key = perturbed(start, seed), jax.random.PRNGKey(100 + seed)
        v2, g2 = jax.value_and_grad(day2_loss)(params, key)
        vj, gj = jax.value_and_grad(joint_loss)(params, key)
        assert float(v2) - float(vj) == pytest.approx(evidence, abs=2e-3)
        for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(gj), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-3)


def test_a_fit_on_day2_with_the_exact_prior_matches_the_joint_fit() -> None:
    """The same optimizer, keys and steps from the same start: identical objectives give the
    same fitted means (to float32 rounding), which also equal the exact posterior."""
    _, day2, both, guide, prior = two_days_with_the_exact_prior(2, 3)

    def fit(loss):
        opt = optax.adam(optax.exponential_decay(0.05, 3000, 0.01))
        params = guide.init_params()
        state = opt.init(params)

        @jax.jit
        def step(params, state, key):
            grads = jax.grad(loss)(params, key)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for i in range(3000):
            params, state = step(params, state, jax.random.PRNGKey(i))
        return params

    sequential = fit(
        lambda p, k: posterior_prior.elbo_loss(k, p, guide, conjugate_model, prior, *day2)
    )
    joint = fit(lambda p, k: guides.elbo_loss(k, p, guide, conjugate_model, *both))
    for name in guide.sites:
        np.testing.assert_allclose(sequential[name]["loc"], joint[name]["loc"], atol=1e-4)
    mean, _ = exact_posterior(design(guide, *both[:2]), np.asarray(both[2], np.float64))
    fitted = np.concatenate([np.asarray(joint[n]["loc"]).ravel() for n in (*guide.globals, TABLE)])
    np.testing.assert_allclose(fitted, mean, atol=0.03)


HIERARCHICAL_TABLE = "RandomEffectsLayer_g_theta"


def hierarchical_guide(family: str, data: tuple, seed: int) -> tuple:
    """Guide ``family`` of the random-effects model, its table coupled and (conditional)
    conditioned on its scale, at parameters moved off their start by ``seed``."""
    sites = guides.latent_sites(hierarchical_model, *data)
    conditional = {HIERARCHICAL_TABLE: "RandomEffectsLayer_g_scale"}
    guide = guides.make_guide(family, sites, coupled=[HIERARCHICAL_TABLE], conditional=conditional)
    return guide, perturbed(guide.init_params(), seed)


@pytest.mark.parametrize("family", guides.GUIDES)
def test_each_family_density_at_its_own_draw_is_its_log_q(family: str) -> None:
    """globals_log_density + rows_log_density at a draw = the draw's own log q over u, for
    the mean-field, structured and conditional guides, with couplings switched on."""
    data = day(4, 50)
    guide, params = hierarchical_guide(family, data, 7)
    sites, table = guide.sites, HIERARCHICAL_TABLE
    draws = guide.draw(jax.random.PRNGKey(3), params)
    u = {n: d.unconstrained for n, d in draws.items() if guides.is_global(sites[n])}
    mine = guide.globals_log_density(params, u) + jnp.sum(
        guide.rows_log_density(table, params[table], draws[table].unconstrained, u, params)
    )
    own = sum(jnp.sum(d.log_normal) for d in draws.values())
    assert float(mine) == pytest.approx(float(own), rel=1e-5, abs=1e-3)


def test_globals_density_is_the_widened_multivariate_normal() -> None:
    """The structured guide's globals at arbitrary points: log N(g; mu, w^2 L L^T)."""
    data = day(5, 30)
    guide = structured(conjugate_model, data)
    params = perturbed(guide.init_params(), 11)
    mu = np.concatenate([np.asarray(params[n]["loc"]).ravel() for n in guide.globals])
    factor = np.asarray(guide.global_factor(params), np.float64)
    rng = np.random.default_rng(0)
    for widen in (1.0, 1.7):
        point = mu + rng.normal(size=mu.shape)
        u, o = {}, 0
        for n in guide.globals:
            shape = guide.sites[n].unconstrained_shape
            k = int(np.prod(shape))
            u[n] = jnp.asarray(point[o : o + k].reshape(shape), jnp.float32)
            o += k
        cov = widen**2 * factor @ factor.T
        expected = multivariate_normal(mu, cov).logpdf(point)
        got = float(guide.globals_log_density(params, u, widen))
        assert got == pytest.approx(expected, rel=1e-5)


def test_new_rows_keep_the_model_prior_and_widen_is_checked() -> None:
    """A row flagged unknown contributes the model's own prior term; widen < 1 is refused."""
    data = day(6, 40, known_categories=4)
    guide = structured(conjugate_model, data)
    params = perturbed(guide.init_params(), 3)
    known = jnp.arange(C) < 4
    prior = posterior_prior.PosteriorPrior(guide, params, {TABLE: known})
    everything = posterior_prior.PosteriorPrior(guide, params)
    key = jax.random.PRNGKey(0)
    current = perturbed(params, 4)
    with_new = posterior_prior.elbo_loss(key, current, guide, conjugate_model, prior, *data)
    all_known = posterior_prior.elbo_loss(key, current, guide, conjugate_model, everything, *data)
    draws = guide.draw(jax.random.split(key)[0], current)
    theta = np.asarray(draws[TABLE].value)[4:]
    model_prior = multivariate_normal(np.zeros(theta.size), np.eye(theta.size)).logpdf(
        theta.ravel()
    )
    day1_prior = float(jnp.sum(everything.rows_term(TABLE, draws)[4:]))
    assert float(all_known) - float(with_new) == pytest.approx(model_prior - day1_prior, abs=2e-3)
    with pytest.raises(ValueError, match=r"widen=0\.5"):
        posterior_prior.PosteriorPrior(guide, params, widen=0.5)


@pytest.mark.parametrize("family", guides.GUIDES)
def test_a_prior_equal_to_the_guide_leaves_the_likelihood_alone(family: str) -> None:
    """With day 1's posterior equal to the current guide, log q(z) - log p_1(z) is 0 at every
    draw, the Jacobians of the positive scales included: the loss is -log p(y | z) alone."""
    data = day(8, 50)
    guide, params = hierarchical_guide(family, data, 5)
    table = HIERARCHICAL_TABLE
    prior = posterior_prior.PosteriorPrior(guide, params)
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        loss = posterior_prior.elbo_loss(key, params, guide, hierarchical_model, prior, *data)
        draw_key, _ = jax.random.split(key)
        values = {n: d.value for n, d in guide.draw(draw_key, params).items()}
        mu = (
            values["InterceptLayer_b_beta"][0, 0]
            + data[0] @ values["FixedPriorLayer_x_beta"][:, 0]
            + values[table][data[1]]
        )
        sigma = values["sigma"]
        log_lik = jnp.sum(jax.scipy.stats.norm.logpdf(data[2], mu, sigma))
        assert float(loss) == pytest.approx(-float(log_lik), rel=1e-5, abs=1e-3)
