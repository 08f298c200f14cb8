"""Ordered tables in the service: a time column read by RandomWalkLayer gets ids in its values'
order (not by frequency), so adjacent rows are adjacent periods, and the walk's fitted
positions follow the simulated series in time order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import load_params, quiet_config
from train import loop
from train import vocab as vocab_lib
from train.model import ordered_columns

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
