"""train/starts.py, the service's data-aware start: the intercept and link globals from the
data, conditional rows at their one-step estimates, and one line for each prior that is
badly scaled for the target."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose
from omegaconf import OmegaConf

from tests.test_start import stats_of
from train import data as data_lib
from train import loop
from train import setup as train_setup
from train.config import Config
from train.plan import ShardingPlan
from train.starts import prior_warnings
from train.state import guide_field


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


def test_one_draw_names_the_scaled_tables_whose_levels_are_mostly_one_or_two_rows(tmp_path):
    from train.model import Columns, build_model
    from train.starts import SPARSE_ROWS, SPARSE_SHARE, one_draw_warnings

    cfg, _ = gaussian_run(tmp_path, 0.0, 1.0)
    cfg.model.terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
        {"layer": "RandomEffectsLayer", "name": "region", "inputs": ["region"]},
        {"layer": "FixedEffectsLayer", "name": "shop", "inputs": ["shop"]},
        {"layer": "FMLayer", "name": "fm", "inputs": ["user", "item"], "low_rank_dim": 2},
    ]
    columns = Columns(("x",), ("user", "region", "shop", "item"))
    rng = np.random.default_rng(0)
    counts = {
        "user": np.concatenate([[0], rng.choice([1, 2, 3, 9], 400, p=[0.4, 0.2, 0.3, 0.1])]),
        "region": np.concatenate([[0], np.full(12, 500)]),
        "shop": np.concatenate([[0], np.ones(50, int)]),  # fixed effects: no learned scale
        "item": np.concatenate([[0], rng.choice([2, 3], 300, p=[0.49, 0.51]), [0, 0]]),
    }
    sizes = {c: len(v) - 1 for c, v in counts.items()}
    model = build_model(cfg.model, columns, sizes)

    assert one_draw_warnings(model.terms, columns.categorical, counts, antithetic=True) == []
    lines = one_draw_warnings(model.terms, columns.categorical, counts, antithetic=False)
    # brute force: the share of observed levels at SPARSE_ROWS rows or fewer, per column
    named = set()
    for column, c in counts.items():
        seen = [n for n in c if n > 0]
        share = sum(n <= SPARSE_ROWS for n in seen) / len(seen)
        if column in ("user", "item") and share >= SPARSE_SHARE:
            named.add(column)
    assert named == {"user"}, named  # item's share sits just under the bar
    assert len(lines) == 2  # the user column, once for its random effects, once in the FM
    assert all("'user'" in line and "optim.antithetic=true" in line for line in lines)
    assert lines[0].startswith("model.terms[user]: ") and lines[1].startswith("model.terms[fm]: ")
    share = np.mean(counts["user"][1:] <= SPARSE_ROWS)
    assert f"{share:.0%} of the 400 levels of column 'user' have" in lines[0]
