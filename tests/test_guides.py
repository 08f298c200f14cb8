"""Guide families: the structured guide's draws and log-density against the joint Normal
they imply (brute force), its mean-field special case, and its marginals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose
from omegaconf import OmegaConf

from blayers import guides
from train.model import Columns, build_model


def small_model_sites():
    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "AdaptiveLayer", "name": "x", "inputs": ["x1", "x2"]},
        {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"]},
    ]
    model = build_model(
        OmegaConf.create({"link": "gaussian", "terms": terms}),
        Columns(("x1", "x2"), ("g",)),
        {"g": 5},
    )
    batch = {"numeric": np.zeros((4, 2), np.float32), "categorical": np.zeros((4, 1), np.int32)}
    return guides.latent_sites(model, batch, num_data=4)


def random_params(guide, rng):
    params = guide.init_params()
    return {
        n: {f: jnp.asarray(rng.normal(0, 0.5, v.shape), jnp.float32) for f, v in p.items()}
        for n, p in params.items()
    }


def flat_unconstrained(guide, draws, names):
    """Unconstrained values (the draws' u) in the given site order, flattened."""
    from numpyro.distributions import biject_to

    parts = [biject_to(guide.sites[n].support).inv(draws[n].value).reshape(-1) for n in names]
    return jnp.concatenate(parts)


def test_structured_log_q_is_the_joint_normal_it_implies(rng):
    sites = small_model_sites()
    table = "RandomEffectsLayer_g_theta"
    guide = guides.StructuredGuide(sites, coupled=[table])
    params = random_params(guide, rng)
    names = [*guide.globals, table]
    # the joint Normal over (g, u): mean and covariance from the parameters
    d = guide.dim
    L = np.zeros((d, d))
    mu_g = np.concatenate([np.asarray(params[n]["loc"]).reshape(-1) for n in guide.globals])
    for n in guide.globals:
        o, size = guide.offsets[n], int(np.prod(sites[n].unconstrained_shape))
        scale = guide.loc_scale(params[n])[1]
        coupling = np.asarray(params[n][guides.COUPLING] * guide._mask(n)).reshape(size, d)
        L[o : o + size] = coupling
        L[o : o + size, o : o + size] += np.diag(np.asarray(scale).reshape(-1))
    rows = sites[table].unconstrained_shape[0]
    A = np.asarray(params[table][guides.COUPLING]).reshape(rows, d)
    s_r = np.asarray(guide.loc_scale(params[table])[1]).reshape(-1)
    m_r = np.asarray(params[table]["loc"]).reshape(-1)
    mean = np.concatenate([mu_g, m_r])
    big = np.zeros((d + rows, d + rows))
    big[:d, :d] = L
    big[d:, :d] = A @ L
    big[d:, d:] = np.diag(s_r)
    cov = big @ big.T
    for seed in range(3):
        draws = guide.draw(jax.random.PRNGKey(seed), params)
        u = np.asarray(flat_unconstrained(guide, draws, names), np.float64)
        diff = u - mean
        _, logdet = np.linalg.slogdet(cov)
        exact = (
            -0.5 * diff @ np.linalg.solve(cov, diff)
            - 0.5 * logdet
            - 0.5 * len(u) * np.log(2 * np.pi)
        )
        # the guide's log q in unconstrained space: its Normal parts (Jacobians aside)
        got = sum(float(jnp.sum(draws[n].log_normal)) for n in names)
        assert_allclose(got, exact, rtol=1e-4, atol=1e-3)


def test_structured_with_zero_coupling_is_mean_field(rng):
    sites = small_model_sites()
    structured = guides.StructuredGuide(sites, coupled=["RandomEffectsLayer_g_theta"])
    mean_field = guides.MeanFieldGuide(sites)
    params = random_params(mean_field, rng)
    zero = {
        n: {**p, guides.COUPLING: jnp.zeros((*p["loc"].shape, structured.dim))}
        for n, p in params.items()
    }
    zero = {
        n: (p if n in (*structured.globals, *structured.coupled) else params[n])
        for n, p in zero.items()
    }
    a, qa = structured.sample(jax.random.PRNGKey(0), zero)
    b, qb = mean_field.sample(jax.random.PRNGKey(0), params)
    for n in a:
        assert_allclose(np.asarray(a[n]), np.asarray(b[n]), rtol=1e-6)
    assert_allclose(float(qa), float(qb), rtol=1e-6)


def test_structured_marginal_sd_matches_draws(rng):
    sites = small_model_sites()
    guide = guides.StructuredGuide(sites)
    params = random_params(guide, rng)
    keys = jax.random.split(jax.random.PRNGKey(1), 20_000)
    from numpyro.distributions import biject_to

    draws = jax.vmap(
        lambda k: {
            n: biject_to(sites[n].support).inv(d.value) for n, d in guide.draw(k, params).items()
        }
    )(keys)
    for n in guide.globals:
        loc, sd = guide.marginal(n, params[n])
        assert_allclose(np.asarray(draws[n]).std(0), np.asarray(sd), rtol=0.03)
        assert_allclose(
            np.asarray(draws[n]).mean(0), np.asarray(loc), atol=0.03 * float(np.max(sd))
        )


def test_row_marginal_matches_draws_of_the_rows(rng):
    """A coupled table row's marginal (what blayers-effects writes) against 20,000 draws."""
    sites = small_model_sites()
    table = "RandomEffectsLayer_g_theta"
    for guide in (guides.StructuredGuide(sites, coupled=[table]), guides.MeanFieldGuide(sites)):
        params = random_params(guide, rng)
        keys = jax.random.split(jax.random.PRNGKey(2), 20_000)
        rows = np.asarray(jax.vmap(lambda k, g=guide, p=params: g.draw(k, p)[table].value)(keys))
        globals_ = {n: params[n] for n in sites if guides.is_global(sites[n])}
        loc, sd = guide.row_marginal(table, params[table], globals_)
        assert_allclose(rows.std(0), np.asarray(sd), rtol=0.03)
        assert_allclose(rows.mean(0), np.asarray(loc), atol=0.03 * float(np.max(sd)))
        if isinstance(guide, guides.StructuredGuide):  # the inherited spread is there
            assert np.all(np.asarray(sd) > guide.loc_scale(params[table])[1] * 1.05)


def test_a_run_resumes_and_restores_with_the_guide_it_was_trained_with(tmp_path):
    from tests.service_helpers import small_config, small_dataset
    from train import loop
    from train.summary import summarize

    data = small_dataset(tmp_path / "data")
    first = small_config(data, tmp_path / "run", **{"optim.guide": "mean_field", "train.steps": 10})
    loop.train(first, log=lambda _: None)
    messages = []
    loop.train(small_config(data, tmp_path / "run", **{"train.steps": 20}), log=messages.append)
    assert any("resuming with optim.guide=mean_field" in m for m in messages)
    assert any(r["site"] == "InterceptLayer_bias_beta" for r in summarize(tmp_path / "run"))


def test_structured_state_is_sharded_like_its_rows():
    """On 8 fake devices with tables split over mesh.model, each coupling leaf (and its Adam
    moments) is split with its table's rows, dense or row-sparse; the globals' couplings are
    replicated."""
    from tests.service_helpers import run_with_devices

    out = run_with_devices(
        8,
        """
        import json, tempfile
        from pathlib import Path
        from tests.service_helpers import small_config, small_dataset
        from train import loop
        tmp = Path(tempfile.mkdtemp())
        cfg = small_config(small_dataset(tmp), tmp / "run", **{"mesh.model": 4, "mesh.data": 2})
        import jax
        loop.train(cfg, log=lambda _: None)
        from train.run import restore_run
        setup, state, _ = restore_run(tmp / "run")
        table = state.params["RandomEffectsLayer_user_theta"]["coupling"]
        intercept = state.params["InterceptLayer_bias_beta"]["coupling"]
        moments = [
            str(leaf.sharding.spec)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
            if "RandomEffectsLayer_user_theta" in str(path) and "coupling" in str(path)
        ]
        from tests.service_helpers import SMALL_TERMS
        terms = [
            {**t, "sparse": True} if t["name"] == "user" else t for t in SMALL_TERMS
        ]
        sparse_cfg = small_config(
            small_dataset(tmp), tmp / "sparse",
            **{"mesh.model": 4, "mesh.data": 2, "model.terms": terms},
        )
        loop.train(sparse_cfg, log=lambda _: None)
        _, sparse_state, _ = restore_run(tmp / "sparse")
        rows = sparse_state.params["RandomEffectsLayer_user_theta"]
        print(json.dumps({
            "table": str(table.sharding.spec), "intercept": str(intercept.sharding.spec),
            "moments": moments, "sparse_fields": sorted(rows),
            "sparse_coupling": str(rows["coupling_state"].sharding.spec),
            "sparse_rows": str(rows["row_state"].sharding.spec),
            "sparse_shape": list(rows["coupling_state"].shape),
        }))
        """,
    )
    # row-sparse: the rows' coupling and its two Adam moments, split with the rows
    assert out["sparse_fields"] == ["coupling_state", "row_state"]
    assert out["sparse_coupling"] == out["sparse_rows"] == "P('model', None)"
    assert out["sparse_shape"][1:] == [3, 1]  # (rows, 1 + moments, the intercept)
    assert out["table"] == "P('model',)"
    assert len(out["moments"]) == 2 and all(m == out["table"] for m in out["moments"])
    assert out["intercept"] == "P()"


TABLE, SCALE = "RandomEffectsLayer_g_theta", "RandomEffectsLayer_g_scale"


def conditional_guide(sites):
    return guides.ConditionalGuide(sites, coupled=[TABLE], conditional={TABLE: SCALE})


def test_conditional_log_q_is_the_density_it_implies(rng):
    """Rows given the globals are Normal with mean ``a + ν(τ+1)/P(λ) + A(g - μ)`` and sd
    ``P(λ)^-½``, ``P = τ + λ⁻²``, λ from the same draw: the guide's log q is that density
    times the globals' joint Normal (brute force, unconstrained space)."""
    from scipy.stats import multivariate_normal, norm

    sites = small_model_sites()
    guide = conditional_guide(sites)
    params = random_params(guide, rng)
    d = guide.dim
    L = np.asarray(guide.global_factor(params), np.float64)
    mu_g = np.concatenate([np.asarray(params[n]["loc"]).reshape(-1) for n in guide.globals])
    A = np.asarray(params[TABLE][guides.COUPLING], np.float64)
    nu = np.asarray(params[TABLE]["loc"], np.float64)
    tau = np.exp(np.asarray(params[TABLE]["raw_scale"], np.float64))
    anchor = float(params[SCALE][guides.ANCHOR])
    k = guide.offsets[SCALE]
    for seed in range(3):
        draws = guide.draw(jax.random.PRNGKey(seed), params)
        g = np.asarray(flat_unconstrained(guide, draws, guide.globals), np.float64)
        u = np.asarray(draws[TABLE].value, np.float64)
        lam = np.exp(g[k])
        precision = tau + lam**-2
        mean = anchor + nu * (tau + 1) / precision + A @ (g - mu_g)[guide.row_index[TABLE]]
        exact = (
            multivariate_normal(mu_g, L @ L.T).logpdf(g)
            + norm(mean, precision**-0.5).logpdf(u).sum()
        )
        got = sum(float(jnp.sum(draws[n].log_normal)) for n in (*guide.globals, TABLE))
        assert_allclose(got, exact, rtol=1e-4, atol=1e-3)
        assert_allclose(float(lam), float(draws[SCALE].value), rtol=1e-5)
    assert d == len(mu_g)


def test_conditional_weak_rows_follow_their_scale(rng):
    """A row with no data (τ → 0) is its prior given λ, whatever λ; a row with much data
    keeps its own mean and sd."""
    sites = small_model_sites()
    guide = conditional_guide(sites)
    rows = {"loc": jnp.asarray([0.3, 0.3]), "raw_scale": jnp.log(jnp.asarray([1e-8, 1e6]))}
    for lam in (0.1, 1.0, 3.0):
        loc, sd = guide.conditional_loc_scale(TABLE, rows, jnp.asarray(lam), 0.0)
        assert_allclose(np.asarray(sd), [lam, 1e-3], rtol=1e-3)
        assert_allclose(float(loc[0]), 0.3 * lam**2, rtol=1e-3)  # shrunk as λ², the prior
        assert_allclose(float(loc[1]), 0.3, rtol=1e-3)


def test_conditional_row_marginal_matches_draws_of_the_rows(rng):
    """Mean and sd of each row, integrated over the scale by quadrature (with the covariance
    a row inherits through its coupling, by Stein's lemma), against 20,000 draws."""
    sites = small_model_sites()
    guide = conditional_guide(sites)
    params = random_params(guide, rng)
    params[SCALE]["loc"] = jnp.asarray(-0.5)
    params[SCALE]["raw_scale"] = jnp.asarray(-0.5)  # a wide scale: the quadrature matters
    keys = jax.random.split(jax.random.PRNGKey(2), 20_000)
    rows = np.asarray(jax.vmap(lambda k: guide.draw(k, params)[TABLE].value)(keys))
    globals_ = {n: params[n] for n in sites if guides.is_global(sites[n])}
    loc, sd = guide.row_marginal(TABLE, params[TABLE], globals_)
    assert_allclose(rows.std(0), np.asarray(sd), rtol=0.03)
    assert_allclose(rows.mean(0), np.asarray(loc), atol=0.03 * float(np.max(sd)))
    # the λ⁻²-weighted mean a Normal prior's quadratic term sees, without coupling
    params[TABLE][guides.COUPLING] = jnp.zeros_like(params[TABLE][guides.COUPLING])
    draws = jax.vmap(lambda k: guide.draw(k, params))(keys)
    inv = 1.0 / np.asarray(draws[SCALE].value, np.float64) ** 2
    expected = (inv[:, None] * np.asarray(draws[TABLE].value)).mean(0) / inv.mean()
    got = guide.weighted_row_mean(TABLE, params[TABLE], params)
    assert_allclose(np.asarray(got), expected, atol=0.03 * float(np.max(sd)))


@pytest.mark.parametrize("unit_axis", [True, False])  # as saved before model.fm_unit_axis, and now
def test_service_conditions_fm_factors_only_when_asked_and_never_shifts_them(rng, unit_axis):
    """With ``fm_rows: site`` the service's conditional guide conditions a categorical FM's
    factor rows on the FM's scale (their prior is Normal(0, λ)); their log q is then the
    conditional Normal of each element (brute force). By default (``free``) they are a
    Normal of their own (train/guide_plan.py says why). Recentering leaves them out either
    way (their effect is a product)."""
    from scipy.stats import norm

    from train import recenter
    from train.guide_plan import service_guide

    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"]},
        {"layer": "FMLayer", "name": "fm", "inputs": ["g", "h"], "low_rank_dim": 3},
    ]
    model = build_model(
        OmegaConf.create({"link": "gaussian", "terms": terms, "fm_unit_axis": unit_axis}),
        Columns((), ("g", "h")),
        {"g": 5, "h": 4},
    )
    batch = {"numeric": np.zeros((4, 0), np.float32), "categorical": np.zeros((4, 2), np.int32)}
    sites = guides.latent_sites(model, batch, num_data=4)
    guide = service_guide("conditional", model.terms, sites, fm_rows="site")
    fm, fm_scale = "CategoricalFMLayer_fm_theta", "CategoricalFMLayer_fm_scale"
    assert guide.conditional[fm] == fm_scale
    assert guide.conditional["RandomEffectsLayer_g_theta"] == "RandomEffectsLayer_g_scale"
    # by default (fm_rows: free) the factors are a Normal of their own; the rows stay
    free = service_guide("conditional", model.terms, sites)
    assert free.conditional == {"RandomEffectsLayer_g_theta": "RandomEffectsLayer_g_scale"}
    free_params = random_params(free, rng)
    assert guides.ANCHOR not in free_params[fm_scale]
    free_draw = free.draw(jax.random.PRNGKey(0), free_params)[fm]
    loc, sd = free.loc_scale(free_params[fm])
    eps = (np.asarray(free_draw.value) - np.asarray(loc)) / np.asarray(sd)
    assert_allclose(eps, np.asarray(free_draw.noise), rtol=1e-4, atol=1e-5)
    shifted = [t.site for t in recenter.plan(model.terms, sites).tables]
    assert shifted == ["RandomEffectsLayer_g_theta"]
    params = random_params(guide, rng)
    nu = np.asarray(params[fm]["loc"], np.float64)
    tau = np.exp(np.asarray(params[fm]["raw_scale"], np.float64))
    anchor = np.asarray(params[fm_scale][guides.ANCHOR], np.float64)
    for seed in range(2):
        draws = guide.draw(jax.random.PRNGKey(seed), params)
        lam = float(draws[fm_scale].value)
        precision = tau + lam**-2
        mean = anchor + nu * (tau + 1) / precision
        exact = norm(mean, precision**-0.5).logpdf(np.asarray(draws[fm].value)).sum()
        assert_allclose(float(jnp.sum(draws[fm].log_normal)), exact, rtol=1e-4)
    assert nu.shape == sites[fm].unconstrained_shape and nu.ndim == (3 if unit_axis else 2)


def test_the_antithetic_pair_is_the_same_elbo_with_less_gradient_noise(rng):
    """``elbo_loss(..., antithetic=True)`` averages a draw and its mirror image: over many keys
    its mean is the one-draw estimate's (both unbiased for the negative ELBO), and the noise
    of the gradient with respect to the table's scale, the one a weakly identified table
    drags down, falls by more than half. ``antithetic=False`` is the one-draw estimate, bit
    for bit."""
    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"]},
    ]
    levels, n = 200, 300
    model = build_model(
        OmegaConf.create({"link": "logit", "terms": terms}), Columns((), ("g",)), {"g": levels}
    )
    ids = rng.integers(0, levels, n).astype(np.int32)
    y = (rng.random(n) < 0.3).astype(np.float32)
    batch = {
        "numeric": np.zeros((n, 0), np.float32),
        "categorical": ids[:, None],
        "target": y,
    }
    sites = guides.latent_sites(model, batch, num_data=n)
    guide = guides.ConditionalGuide(
        sites,
        coupled=["RandomEffectsLayer_g_theta"],
        conditional={"RandomEffectsLayer_g_theta": "RandomEffectsLayer_g_scale"},
    )
    params = guide.init_params(row_precision={"RandomEffectsLayer_g_theta": 0.2})
    scale = "RandomEffectsLayer_g_scale"
    params[scale] = {**params[scale], "loc": jnp.asarray(np.log(0.5), jnp.float32)}

    def loss(key, p, antithetic):
        return guides.elbo_loss(key, p, guide, model, batch, num_data=n, antithetic=antithetic)

    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    one = jax.jit(jax.vmap(jax.value_and_grad(lambda k, p: loss(k, p, False), 1), (0, None)))
    pair = jax.jit(jax.vmap(jax.value_and_grad(lambda k, p: loss(k, p, True), 1), (0, None)))
    v1, g1 = one(keys, params)
    v2, g2 = pair(keys, params)
    se = float(np.std(v1)) / np.sqrt(len(keys))
    assert abs(float(np.mean(v1)) - float(np.mean(v2))) < 4 * se
    d1, d2 = np.asarray(g1[scale]["loc"]), np.asarray(g2[scale]["loc"])
    assert abs(d1.mean() - d2.mean()) < 4 * d1.std() / np.sqrt(len(keys))
    assert d2.var() < 0.5 * d1.var(), (d1.var(), d2.var())
    plain = jax.jit(
        lambda k, p: guides.elbo_loss(k, p, guide, model, batch, num_data=n)
    )  # the default: one draw
    assert np.array_equal(np.asarray(plain(keys[0], params)), np.asarray(v1[0]))
