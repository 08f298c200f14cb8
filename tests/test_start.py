"""Data-aware starts: streaming target moments, each link's moment estimates on data with a
known truth, each link's score at the start, the service's initial state (conditional rows
at their one-step estimates), and the warnings for badly scaled priors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose
from numpyro import handlers
from omegaconf import OmegaConf

from blayers import links
from blayers.links import link_start
from blayers.start import CategorySums, TargetStats
from train import data as data_lib
from train import loop
from train import setup as train_setup
from train.config import Config
from train.plan import ShardingPlan
from train.starts import prior_warnings
from train.state import guide_field


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


def gaussian_run(tmp_path, mean: float, sd: float, **overrides):
    rng = np.random.default_rng(1)
    n = 2000
    g = rng.integers(0, 14, n)
    y = mean + rng.normal(0, sd, n)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"g": g, "x": rng.normal(size=n), "y": y}), path)
    cfg = OmegaConf.structured(Config)
    cfg.run_dir = str(tmp_path / "run")
    cfg.data.path = str(path)
    cfg.data.numeric = ["x"]
    cfg.data.categorical = ["g"]
    cfg.data.batch_size = 80
    cfg.model.link = "gaussian"
    cfg.model.terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "AdaptiveLayer", "name": "dense", "inputs": ["x"]},
        {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"]},
    ]
    cfg.train.steps = 0
    cfg.train.progress = False
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg, y


def service_setup(cfg, store, vocabs) -> train_setup.Setup:
    """The service's setup with every statistic the encode pass gives it."""
    return train_setup.make_setup(
        cfg,
        {c: v.size for c, v in vocabs.items()},
        store.num_rows,
        ShardingPlan.from_config(cfg),
        None,
        store.target_stats,
        store.feature_stats,
        {c: v.counts for c, v in vocabs.items()},
        store.category_sums,
    )


def initial_locs(cfg) -> dict[str, np.ndarray]:
    store, vocabs = data_lib.prepare(
        cfg.data, cfg.run_dir and __import__("pathlib").Path(cfg.run_dir), "gaussian"
    )
    state = service_setup(cfg, store, vocabs).init()
    return {k: np.asarray(v["loc"]) for k, v in state.params.items()}


def test_service_starts_the_intercept_and_sigma_from_the_data(tmp_path):
    cfg, y = gaussian_run(tmp_path, 3.2, 2.0)
    locs = initial_locs(cfg)
    assert_allclose(locs["InterceptLayer_bias_beta"], [[y.mean()]], rtol=1e-5)
    assert_allclose(np.exp(locs["sigma"]), y.std(), rtol=1e-4)
    assert np.all(locs["RandomEffectsLayer_g_theta"] == 0)  # init: 0; fresh_state moves them
    zero, _ = gaussian_run(tmp_path / "z", 3.2, 2.0, **{"optim.start": "zero"})
    assert np.all(initial_locs(zero)["InterceptLayer_bias_beta"] == 0)


def test_conditional_rows_start_at_their_one_step_estimate(tmp_path):
    """Rows start where one Newton step from the start puts them at every scale: site
    precision n_r / s² and site mean (S_r - n_r ȳ) / s² / (τ_r + 1); their count-weighted
    sum is 0, so the table's mean does not trade with the intercept at the start. The sums
    come from the encode pass, and a store encoded without them gets the same ones."""
    cfg, y = gaussian_run(tmp_path, 3.2, 2.0)
    run = tmp_path / "run"
    store, vocabs = data_lib.prepare(cfg.data, run, "gaussian")
    raw = pq.read_table(cfg.data.path)
    ids = vocabs["g"].encode(raw.column("g"))
    n = np.bincount(ids, minlength=vocabs["g"].size)
    total = np.bincount(ids, weights=raw.column("y").to_numpy(), minlength=len(n))
    info = 1.0 / y.std() ** 2
    tau = n * info + 1e-2
    want = (total - n * y.mean()) * info / (tau + 1.0)
    assert abs(np.sum(want * (tau + 1.0))) < 1e-6 * np.sum(np.abs(want * (tau + 1.0)))

    def start_rows(store, vocabs):
        setup = service_setup(cfg, store, vocabs)
        params = train_setup.fresh_state(setup).params["RandomEffectsLayer_g_theta"]
        fields = [np.asarray(guide_field(params, f)) for f in ("loc", "raw_scale")]
        return [f.reshape(len(f), -1)[: len(n), 0] for f in fields]

    loc, raw_scale = start_rows(store, vocabs)
    assert_allclose(raw_scale, np.log(tau), rtol=1e-5)
    assert_allclose(loc, want, rtol=1e-4, atol=1e-6)
    assert np.abs(loc).max() > 1e-3  # the data moved them
    (run / "data" / data_lib.CATEGORY_SUMS).unlink()
    again = data_lib.prepare(cfg.data, run, "gaussian")
    assert (run / "data" / data_lib.CATEGORY_SUMS).exists()
    assert_allclose(start_rows(*again)[0], loc, rtol=1e-6)


@pytest.mark.parametrize("bad", ["median", ""])
def test_unknown_start_is_a_config_error(tmp_path, bad):
    cfg, _ = gaussian_run(tmp_path, 0.0, 1.0, **{"optim.start": bad})
    with pytest.raises(loop.ConfigError, match=r"optim\.start"):
        initial_locs(cfg)


def test_badly_scaled_priors_are_named_with_the_fix(tmp_path):
    cfg, y = gaussian_run(tmp_path, 3000.0, 1000.0)
    from train.model import Columns, build_model

    model = build_model(cfg.model, Columns(("x",), ("g",)), {"g": 14})
    lines = prior_warnings(model.terms, "gaussian", {}, stats_of(y))
    text = "\n".join(lines)
    assert "model.terms[bias]" in text and "coef_kwargs" in text
    assert "model.terms[dense]" in text and "scale_kwargs: {scale:" in text
    assert "model.terms[g]" in text
    assert "model.link_kwargs: sigma" in text
    # a standardized target raises nothing
    assert prior_warnings(model.terms, "gaussian", {}, stats_of((y - y.mean()) / y.std())) == []


def test_train_logs_the_warnings_before_any_step(tmp_path):
    cfg, _ = gaussian_run(tmp_path, 3000.0, 1000.0, **{"train.steps": 1})
    messages = []
    loop.train(cfg, log=messages.append)
    warnings = [m for m in messages if m.startswith("warning: model.")]
    assert len(warnings) >= 3
