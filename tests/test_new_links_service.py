"""The gamma, exponential and zero-inflated negative binomial links through the service's
command lines: each trains and scores, and summarizes its own global sites, on a small
crossed random-effects dataset, and a target outside its support is refused at the start. A
link of the user's own is one registered record."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from blayers import links
from tests.service_helpers import quiet_config, refusal, run_cli
from train import loop, synth
from train.summary import summarize

GLOBALS = {"gamma": ["gamma_shape"], "exponential": [], "zinb": ["zinb_gate", "zinb_concentration"]}


@pytest.mark.parametrize("link", sorted(GLOBALS))
def test_link_trains_summarizes_and_scores_through_the_cli(tmp_path, link):
    data = tmp_path / "data.parquet"
    cols = synth.crossed_effects(data, 1000, {"a": 12, "b": 30}, {"a": 0.4, "b": 0.3}, link, 0.5)
    run = tmp_path / "run"
    common = [f"run_dir={run}", "train.progress=false"]
    proc = run_cli(
        "train",
        *common,
        f"data.path={data}",
        "data.numeric=[]",
        "data.categorical=[a,b]",
        "data.batch_size=250",
        f"model.link={link}",
        "model.terms=[{layer: InterceptLayer, name: bias},"
        "{layer: RandomEffectsLayer, name: a, inputs: [a]},"
        "{layer: RandomEffectsLayer, name: b, inputs: [b]}]",
        "train.steps=200",
        "checkpoint.every=200",
        "mesh.data=1",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the summary in this process (its command line is the same function, tested elsewhere)
    sites = {r["site"] for r in summarize(run, draws=200)}
    assert {"InterceptLayer_bias_beta", *GLOBALS[link]} <= sites
    scores = tmp_path / "scores"
    proc = run_cli("score", f"run_dir={run}", f"data.path={data}", f"output={scores}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(sorted(scores.glob("part-*.parquet"))[0])
    mean = table["mean"].to_numpy()
    assert table.num_rows == len(cols["y"]) and (mean > 0).all()
    # the predicted means follow the data: correlated with the target, on its scale
    y = cols["y"][: table.num_rows]
    assert 0.5 < mean.mean() / y.mean() < 2.0


def test_a_target_outside_the_support_is_refused(tmp_path):
    data = tmp_path / "data.parquet"
    synth.crossed_effects(data, 200, {"a": 5}, {"a": 0.3}, "gaussian", 0.0)
    said = refusal(
        run_cli(
            "train",
            f"run_dir={tmp_path / 'run'}",
            f"data.path={data}",
            "data.numeric=[]",
            "data.categorical=[a]",
            "data.batch_size=96",
            "model.link=gamma",
            "model.terms=[{layer: InterceptLayer, name: bias}]",
        )
    )
    assert "'y'" in said and "positive reals" in said
    for left in ("checkpoints", "vocab"):
        assert not (tmp_path / "run" / left).exists()


@pytest.fixture
def laplace_link():
    import numpyro.distributions as dists

    from blayers.links import _flat, _global, _observe

    def laplace(y_hat, y=None, *, num_data=None):
        mu = _flat(y_hat)
        scale = _global("laplace_scale", dists.Exponential(1.0))
        return _observe(dists.Laplace(mu, scale), y, mu.shape[0], num_data)

    links.register_link("laplace", links.LinkSpec(laplace, lambda y: True, "any real number"))
    yield
    links.LINKS.pop("laplace")


def test_a_registered_link_of_the_users_own_trains_in_the_service(tmp_path, laplace_link):
    data = tmp_path / "data.parquet"
    synth.crossed_effects(data, 800, {"a": 8}, {"a": 0.5}, "gaussian", 2.0)
    settings = {
        "data.numeric": [],
        "data.categorical": ["a"],
        "data.batch_size": 200,
        "model.link": "laplace",
        "model.terms": synth.crossed_terms(["a"]),
        "train.steps": 300,
        "checkpoint.every": 300,
        "mesh.data": 1,
    }
    loop.train(quiet_config(data, tmp_path / "run", settings), log=lambda _: None)
    rows = {r["site"]: r for r in summarize(tmp_path / "run", draws=500)}
    assert "laplace_scale" in rows
    # no data-aware start of its own: the intercept still finds the target's centre
    assert abs(rows["InterceptLayer_bias_beta"]["mean"] - 2.0) < 0.5
