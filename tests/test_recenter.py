"""Recentering: the move leaves every linear-predictor draw unchanged, lands on the optimum of
the ELBO's prior terms (checked by brute force), works on both table layouts, and takes a run
started far from the data to the posterior of a centered one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose
from numpyro.distributions import Normal
from omegaconf import OmegaConf

from tests import service_helpers
from train import recenter as rc
from train import synth
from train.model import Columns, build_model

SIZES = {"g": 14, "h": 40}


def plan_and_params(rng, dims: int = 1):
    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"]},
        {"layer": "EmbeddingLayer", "name": "h", "inputs": ["h"], "embedding_dim": dims},
    ]
    cfg = OmegaConf.create({"link": "gaussian", "terms": terms})
    model = build_model(cfg, Columns((), ("g", "h")), SIZES)
    from blayers import guides

    batch = {"numeric": np.zeros((4, 0), np.float32), "categorical": np.zeros((4, 2), np.int32)}
    sites = guides.latent_sites(model, batch, num_data=4)
    found = rc.plan(model.terms, sites)
    params = {
        name: {
            "loc": rng.normal(1.5, 0.5, site.unconstrained_shape).astype(np.float32),
            "raw_scale": rng.normal(-1.0, 0.3, site.unconstrained_shape).astype(np.float32),
        }
        for name, site in sites.items()
    }
    seen = {
        t.site: (rng.random(sites[t.site].shape[0]) < 0.8).astype(np.float32) for t in found.tables
    }
    return found, params, seen, guides.MeanFieldGuide(sites)


def softplus(x):
    return np.logaddexp(0.0, x)


def prior_terms(params, recenter, seen, draws: int = 40_000, seed: int = 3) -> float:
    """Monte Carlo E_q[log p(rows | λ) + log p(b)] over seen rows, common random numbers."""
    rng = np.random.default_rng(seed)
    total = 0.0
    b = params[recenter.intercept]
    eb = rng.standard_normal(draws)
    bval = b["loc"][0, 0] + softplus(b["raw_scale"][0, 0]) * eb
    total += Normal(recenter.prior_loc, recenter.prior_scale).log_prob(bval).mean()
    for t in recenter.tables:
        lam = params[t.scale_site]
        u = lam["loc"] + softplus(lam["raw_scale"]) * rng.standard_normal(draws)
        loc = np.asarray(params[t.site]["loc"]).reshape(len(seen[t.site]), -1)
        sd = softplus(np.asarray(params[t.site]["raw_scale"])).reshape(loc.shape)
        # E over θ in closed form given λ: -log λ - (m² + s²)/(2λ²) - log √(2π)
        sq = (seen[t.site][:, None] * (loc**2 + sd**2)).sum()
        total += np.mean(-seen[t.site].sum() * loc.shape[1] * u - 0.5 * sq * np.exp(-2 * u))
    return float(total)


@pytest.mark.parametrize("dims", [1, 3])
def test_shift_keeps_every_predictor_draw_and_maximises_the_prior_terms(rng, dims):
    found, params, seen, guide = plan_and_params(rng, dims)
    moved = {
        k: {f: np.asarray(v) for f, v in p.items()}
        for k, p in rc.shift(params, seen, found, guide).items()
    }
    b0, b1 = params[found.intercept]["loc"][0, 0], moved[found.intercept]["loc"][0, 0]
    # the likelihood sees intercept + one row of each table (summed over embedding dims):
    # for every seen row that sum is unchanged; unseen rows are not moved
    for t in found.tables:
        rows0 = params[t.site]["loc"].reshape(len(seen[t.site]), -1).sum(1)
        rows1 = moved[t.site]["loc"].reshape(len(seen[t.site]), -1).sum(1)
        s = seen[t.site] > 0
        assert not np.allclose(rows0[s], rows1[s])  # it did move
        assert_allclose(np.asarray(rows0[~s]), np.asarray(rows1[~s]), rtol=0, atol=0)
    eta0 = b0 + sum(
        params[t.site]["loc"].reshape(len(seen[t.site]), -1).sum(1)[:, None]
        for t in found.tables[:1]
    )
    eta1 = b1 + sum(
        moved[t.site]["loc"].reshape(len(seen[t.site]), -1).sum(1)[:, None]
        for t in found.tables[:1]
    )
    s = seen[found.tables[0].site] > 0
    # each table moved its own mean; the intercept carries the sum of both moves
    delta_h = (
        (moved[found.tables[1].site]["loc"] - params[found.tables[1].site]["loc"])
        .reshape(len(seen[found.tables[1].site]), -1)
        .sum(1)
    )
    hs = seen[found.tables[1].site] > 0
    assert_allclose(eta1[s, 0] + delta_h[hs][0], eta0[s, 0], atol=1e-5)
    # the scales are untouched
    for name in params:
        assert_allclose(moved[name]["raw_scale"], params[name]["raw_scale"])
    before, after = prior_terms(params, found, seen), prior_terms(moved, found, seen)
    assert after > before + 1.0
    # brute force: no perturbation of the final table's shift does better (the move's last
    # table is at its exact optimum given the others)
    last = found.tables[-1]
    for eps in (-0.02, 0.02):
        probe = {k: dict(v) for k, v in moved.items()}
        loc = probe[last.site]["loc"].reshape(len(seen[last.site]), -1)
        probe[last.site]["loc"] = (loc - eps * seen[last.site][:, None]).reshape(
            moved[last.site]["loc"].shape
        )
        probe[found.intercept]["loc"] = moved[found.intercept]["loc"] + eps * loc.shape[1]
        assert prior_terms(probe, found, seen) < after


def test_row_state_layout_moves_the_same_rows(rng):
    found, params, seen, guide = plan_and_params(rng)
    dense = rc.shift(params, seen, found, guide)
    packed = dict(params)
    site = found.tables[0].site
    packed[site] = {
        "row_state": np.stack(
            [params[site]["loc"], params[site]["raw_scale"], params[site]["loc"] * 0], 1
        )
    }
    sparse = rc.shift(packed, seen, found, guide)
    assert_allclose(
        np.asarray(sparse[site]["row_state"][:, 0]), np.asarray(dense[site]["loc"]), rtol=1e-6
    )
    assert_allclose(np.asarray(sparse[site]["row_state"][:, 2]), 0.0)
    assert_allclose(
        np.asarray(sparse[found.intercept]["loc"]),
        np.asarray(dense[found.intercept]["loc"]),
        rtol=1e-6,
    )


def test_terms_without_an_exact_direction_are_left_alone():
    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {
            "layer": "RandomEffectsLayer",
            "name": "g",
            "inputs": ["g"],
            "coef_dist": "StudentT",
            "coef_kwargs": {"df": 3.0, "loc": 0.0},
        },
        {"layer": "EmbeddingLayer", "name": "h", "inputs": ["h"], "slopes": ["x"]},
        {"layer": "FMLayer", "name": "fm", "inputs": ["g", "h"], "low_rank_dim": 2},
    ]
    cfg = OmegaConf.create({"link": "gaussian", "terms": terms})
    model = build_model(cfg, Columns(("x",), ("g", "h")), SIZES)
    from blayers import guides

    batch = {"numeric": np.zeros((4, 1), np.float32), "categorical": np.zeros((4, 2), np.int32)}
    assert rc.plan(model.terms, guides.latent_sites(model, batch, num_data=4)) is None


CROSSED = {"levels": {"a": 14, "b": 60, "c": 150}, "sds": {"a": 0.4, "b": 0.8, "c": 0.6}}


def crossed_data(path, seed: int, mean: float, n: int = 6000):
    """Gaussian target with mean ``mean`` and three crossed factors (14, 60, 150 levels)."""
    return synth.crossed_effects(path, n, **CROSSED, intercept=mean, seed=seed)["y"]


def crossed_config(data, run_dir, **overrides):
    return service_helpers.crossed_config(data, run_dir, list(CROSSED["levels"]), **overrides)


def scales(run_dir) -> dict[str, float]:
    from train.summary import summarize

    rows = summarize(run_dir, draws=2000)
    return {r["site"]: r["mean"] for r in rows if r["site"].endswith("_scale")}


@pytest.mark.slow
def test_a_run_started_far_from_the_data_reaches_the_centered_posterior(tmp_path):
    from train import loop

    y = crossed_data(tmp_path / "raw.parquet", seed=0, mean=3.0)
    table = pq.read_table(tmp_path / "raw.parquet")
    centered = table.set_column(3, "y", pa.array((y - y.mean()).astype(np.float32)))
    pq.write_table(centered, tmp_path / "centered.parquet")
    quiet = {"log": lambda _: None}
    loop.train(
        crossed_config(tmp_path / "centered.parquet", tmp_path / "c", **{"optim.start": "zero"}),
        **quiet,
    )
    loop.train(
        crossed_config(tmp_path / "raw.parquet", tmp_path / "bad", **{"optim.start": "zero"}),
        **quiet,
    )
    reference, bad = scales(tmp_path / "c"), scales(tmp_path / "bad")
    for site in reference:
        assert_allclose(bad[site], reference[site], rtol=0.05, err_msg=site)


@pytest.mark.parametrize("family", ["structured", "conditional"])
def test_structured_moves_keep_every_predictor_draw_and_raise_the_elbo(rng, family):
    """Mean shift and variance move together, on the structured guide and on the
    conditional one (whose rows' means depend on λ, so the shift moves its anchor): same
    linear predictor for every example under every noise draw, and a higher ELBO (brute
    force: common-random-number estimates of the full ELBO before and after)."""
    import jax

    from blayers import guides
    from train.model import LINEAR_PREDICTOR

    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"]},
        {"layer": "RandomEffectsLayer", "name": "h", "inputs": ["h"]},
    ]
    model = build_model(
        OmegaConf.create({"link": "gaussian", "terms": terms}), Columns((), ("g", "h")), SIZES
    )
    n = 300
    ids = np.stack([rng.integers(0, 11, n), rng.integers(0, 30, n)], 1).astype(np.int32)
    y = (2.0 + rng.normal(0, 0.5, 14)[ids[:, 0]] + rng.normal(0, 0.5, 40)[ids[:, 1]]).astype(
        np.float32
    )
    batch = {"numeric": np.zeros((n, 0), np.float32), "categorical": ids, "target": y}
    sites = guides.latent_sites(model, batch, num_data=n)
    found = rc.plan(model.terms, sites)
    tables = [t.site for t in found.tables]
    guide = guides.make_guide(
        family, sites, tables, None, {t.site: t.scale_site for t in found.tables}
    )
    params = {
        name: {
            f: np.asarray(rng.normal(0, 0.3, v.shape) + (1.0 if f == "loc" else 0.0), np.float32)
            for f, v in p.items()
        }
        for name, p in guide.init_params().items()
    }
    params["InterceptLayer_bias_beta"]["raw_scale"] = np.full((1, 1), -4.0, np.float32)  # sd 0.02
    seen = {
        "RandomEffectsLayer_g_theta": (np.arange(SIZES["g"] + 1) < 11).astype(np.float32),
        "RandomEffectsLayer_h_theta": (np.arange(SIZES["h"] + 1) < 30).astype(np.float32),
    }
    seen = {t: seen[t][: sites[t].shape[0]] for t in tables}
    moved = rc.shift(params, seen, found, guide)
    keys = jax.random.split(jax.random.PRNGKey(0), 3000)

    def eta(p, k):
        values = {s: d.value for s, d in guide.draw(k, p).items()}
        from numpyro import handlers

        tr = handlers.trace(handlers.substitute(handlers.seed(model, 0), values)).get_trace(
            batch, n
        )
        return tr[LINEAR_PREDICTOR]["value"][:, 0]

    for k in keys[:5]:
        assert_allclose(np.asarray(eta(moved, k)), np.asarray(eta(params, k)), atol=2e-4)
    elbo = jax.jit(
        jax.vmap(lambda k, p: -guides.elbo_loss(k, p, guide, model, batch, num_data=n), (0, None))
    )
    before, after = float(elbo(keys, params).mean()), float(elbo(keys, moved).mean())
    assert after > before + 1.0, (before, after)
    # the intercept's spread grew towards the rows' common uncertainty
    assert guide.marginal("InterceptLayer_bias_beta", moved["InterceptLayer_bias_beta"])[1] > 0.05
