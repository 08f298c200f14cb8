"""ArviZ export (train.inference_data, Run.to_arviz): the groups az.summary, az.loo,
az.plot_forest and az.plot_ppc need, named by columns and categories, and each group
consistent with what the service reports elsewhere."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import score_cfg, small_config, small_dataset
from train import loop
from train import score as score_lib
from train.api import Run
from train.config import ConfigError
from train.data import DataError

az = pytest.importorskip("arviz")
DRAWS = 400


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arviz")
    data = small_dataset(tmp)
    cfg = small_config(data, tmp / "run", **{"train.steps": 60})
    loop.train(cfg, log=lambda _: None)
    held = pq.read_table(data).slice(0, 500)
    run = Run(cfg.run_dir)
    idata = run.to_arviz(draws=DRAWS, rows={"region": ["r0", "r3"]}, data=held)
    return run, held, idata, tmp


def test_groups_shapes_and_names(trained):
    _, held, idata, _ = trained
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
    }
    post = idata.posterior
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == DRAWS
    assert list(post["AdaptiveLayer_dense_beta"].coords["dense_input"].values) == [
        "x1",
        "x2",
        "x3",
        "x4",
    ]
    assert list(post["region_rows"].coords["region_level"].values) == ["r0", "r3"]
    assert idata.posterior_predictive["y"].shape == (1, DRAWS, 500)
    np.testing.assert_array_equal(idata.observed_data["y"].values, held["y"].to_numpy())


def test_posterior_matches_the_summary_and_the_per_level_effects(trained):
    run, _, idata, _ = trained
    summary = run.summary(draws=4000)
    for _, row in summary[summary["index"] == ""].iterrows():  # the scalar sites
        drawn = idata.posterior[row["site"]].values.ravel()
        assert abs(drawn.mean() - row["mean"]) < 4 * row["std"] / np.sqrt(DRAWS) + 1e-6
    effects = run.effects("region").set_index("value")
    for level in ("r0", "r3"):
        drawn = idata.posterior["region_rows"].sel(region_level=level).values.ravel()
        assert abs(drawn.mean() - effects.loc[level, "mean"]) < 4 * effects.loc[level, "sd"] / 20
        assert abs(drawn.std() / effects.loc[level, "sd"] - 1) < 0.15


def test_log_likelihood_is_the_bernoulli_of_the_scored_probability(trained, tmp_path):
    """exp(log p(y | θ)) averaged over draws is the posterior mean of p(y | θ): the score's
    ``mean`` (for y = 1) or one minus it, up to Monte Carlo error."""
    run, held, idata, _ = trained
    pq.write_table(held, tmp_path / "held.parquet")
    score_lib.score(
        score_cfg(run.run_dir, tmp_path / "held.parquet", tmp_path / "s", draws=DRAWS),
        log=lambda _: None,
    )
    p = pq.read_table(tmp_path / "s")["mean"].to_numpy()
    y = held["y"].to_numpy()
    ll = idata.log_likelihood["y"].values[0]
    assert np.all(ll <= 0)
    likelihood = np.exp(ll)
    gap = np.abs(likelihood.mean(0) - np.where(y == 1, p, 1 - p))
    assert np.max(gap) < 0.05
    # two independent Monte Carlo means of DRAWS draws each: within 5 standard errors
    standard_error = likelihood.std(0) * np.sqrt(2.0 / DRAWS)
    assert np.max(gap / standard_error) < 5.0, np.max(gap / standard_error)


# ArviZ 0.23's plots call a matplotlib 3.11 API that warns of its own deprecation
@pytest.mark.filterwarnings("ignore:Passing a dict or None as alias_mapping")
# a short fit's importance weights may be heavy-tailed: that is ArviZ judging the fit, and it
# says so through loo.pareto_k, checked below
@pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto distribution")
def test_arviz_functions_run_on_it(trained):
    import matplotlib

    matplotlib.use("Agg")
    _, _, idata, _ = trained
    table = az.summary(idata, var_names=["RandomEffectsLayer_user_scale", "region_rows"])
    assert {"mean", "sd", "hdi_3%", "hdi_97%"} <= set(table.columns)
    loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo.elpd_loo) and loo.elpd_loo < 0
    assert loo.pareto_k.shape == (500,) and np.all(np.isfinite(loo.pareto_k.values))
    az.plot_forest(idata, var_names=["AdaptiveLayer_dense_beta"])
    az.plot_ppc(idata, num_pp_samples=20)


def test_without_data_only_the_posterior(trained):
    run, _, _, _ = trained
    idata = run.to_arviz(draws=20)
    assert set(idata.groups()) == {"posterior"}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"rows": {"region": ["nowhere"]}}, ConfigError, "nowhere"),
        ({"rows": {"dense": [1]}}, ConfigError, "term='dense'"),
        ({"data": "HELD", "max_rows": 100}, ConfigError, "max_rows=100"),
        ({"data": "NO_X1"}, DataError, "x1"),
    ],
)
def test_bad_requests_are_refused_naming_what_to_fix(trained, kwargs, error, message):
    run, held, _, _ = trained
    if kwargs.get("data") == "HELD":
        kwargs["data"] = held
    elif kwargs.get("data") == "NO_X1":
        kwargs["data"] = held.drop(["x1"])
    with pytest.raises(error, match=message):
        run.to_arviz(draws=5, **kwargs)
