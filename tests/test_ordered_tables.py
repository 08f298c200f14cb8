"""Ordered tables in the service: a time column read by RandomWalkLayer or AR1Layer gets ids in
its values' order (not by frequency), so adjacent rows are adjacent periods; the walk's fitted
positions and the AR(1) states follow the simulated series in time order, the AR(1)'s
persistence and innovation sd are recovered, and a period after the last one scores as the
one-step forecast."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import load_params, quiet_config, run_cli
from train import loop
from train import vocab as vocab_lib
from train.config import ConfigError
from train.model import ordered_columns
from train.summary import summarize

SLOTS, RHO, SIGMA = 40, 0.8, 0.5


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    rng = np.random.default_rng(11)
    theta = [rng.normal(0, SIGMA / np.sqrt(1 - RHO**2))]
    for _ in range(SLOTS - 1):
        theta.append(RHO * theta[-1] + rng.normal(0, SIGMA))
    theta = np.asarray(theta)
    # periods seen unequally often, in an order unrelated to time
    weights = rng.permutation(np.arange(1, SLOTS + 1)).astype(float)
    t = rng.choice(SLOTS, 4000, p=weights / weights.sum())
    y = 1.0 + theta[t] + rng.normal(0, 0.3, len(t))
    path = tmp_path_factory.mktemp("ar1") / "train.parquet"
    pq.write_table(pa.table({"t": (t * 7 + 2000).astype(np.int64), "y": y}), path)
    return path, theta


def settings(layer: str) -> dict:
    extra = {"embedding_dim": 1}
    return {
        "data.numeric": [],
        "data.categorical": ["t"],
        "data.batch_size": 200,
        "model.link": "gaussian",
        "model.terms": [
            {"layer": "InterceptLayer", "name": "bias"},
            {"layer": layer, "name": "time", "inputs": ["t"], **extra},
        ],
        "train.steps": 2000,
        "checkpoint.every": 2000,
        "optim.lr": 0.03,
        "mesh.data": 1,
    }


def test_ordered_columns_are_those_of_time_ordered_terms():
    model = {
        "terms": [
            {"layer": "RandomWalkLayer", "name": "w", "inputs": ["week"]},
            {"layer": "RandomEffectsLayer", "name": "u", "inputs": ["user"]},
        ]
    }
    assert ordered_columns(model) == {"week"}


def test_time_ids_follow_the_values_and_the_walk_follows_the_series(series, tmp_path):
    path, theta = series
    cfg = quiet_config(path, tmp_path / "run", settings("RandomWalkLayer"))
    loop.train(cfg, log=lambda _: None)
    vocab = vocab_lib.load_all(tmp_path / "run" / "vocab", ["t"])["t"]
    values = vocab.values.to_numpy()
    assert (np.diff(values) > 0).all()  # ascending: id k is the k-th period
    # positions are the increments' running sum; up to the intercept, they track the series
    increments = load_params(tmp_path / "run")["RandomWalkLayer_time_theta.loc"][:SLOTS, 0]
    assert np.corrcoef(np.cumsum(increments), theta)[0, 1] > 0.95


def ar1_settings() -> dict:
    out = settings("AR1Layer")
    out["model.terms"] = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "AR1Layer", "name": "time", "inputs": ["t"]},
    ]
    return out


def test_ar1_states_follow_the_series_and_a_later_period_is_forecast(series, tmp_path):
    path, theta = series
    run = tmp_path / "run"
    loop.train(quiet_config(path, run, ar1_settings()), log=lambda _: None)
    states = load_params(run)["AR1Layer_time_theta.loc"][:SLOTS, 0]
    assert np.corrcoef(states, theta)[0, 1] > 0.97
    rows = {r["site"]: r for r in summarize(run, draws=2000)}
    for site, truth in (("AR1Layer_time_rho", RHO), ("AR1Layer_time_scale", SIGMA)):
        got = rows[site]
        assert abs(got["mean"] - truth) < 3.5 * got["std"] + 0.05, (site, got)
    # the period after the last: the one-step forecast rho * state, its spread sigma wider
    last = int(pq.read_table(path)["t"].to_numpy().max())
    future = tmp_path / "future.parquet"
    pq.write_table(pa.table({"t": np.array([last, last + 7], np.int64)}), future)
    scores = tmp_path / "scores"
    proc = run_cli("score", f"run_dir={run}", f"data.path={future}", f"output={scores}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(scores)
    assert table["unseen_categories"].to_pylist() == [False, True]
    mean, std = table["mean"].to_numpy(), table["std"].to_numpy()
    bias = rows["InterceptLayer_bias_beta"]["mean"]
    rho = rows["AR1Layer_time_rho"]["mean"]
    assert abs((mean[1] - bias) - rho * (mean[0] - bias)) < 0.1, (mean, bias, rho)
    assert std[1] > std[0] + 0.2  # a forecast is wider than a fitted state by about sigma


def test_the_service_refuses_the_non_centred_ar1(series, tmp_path):
    path, _ = series
    settings_ = ar1_settings()
    settings_["model.terms"][1]["noncentered"] = True
    with pytest.raises(ConfigError, match="drop noncentered"):
        loop.train(quiet_config(path, tmp_path / "run", settings_), log=lambda _: None)
    assert not (tmp_path / "run" / "checkpoints").exists()
