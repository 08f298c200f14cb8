"""RandomSlopesLayer in the service: a table term (``inputs: [group]``, ``slopes: [columns]``)
whose ``(c, d, u)`` table trains dense or row-sparse to the same slopes, scores through the
command line, and shards over the model axis."""

from __future__ import annotations

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose

from tests.service_helpers import load_params, quiet_config, run_cli
from train import loop
from train import setup as train_setup
from train import vocab as vocab_lib
from train.config import ConfigError
from train.plan import ShardingPlan

SLOPES = np.array([-1.2, -0.6, -0.1, 0.3, 0.8, 1.1])
SITE = "RandomSlopesLayer_s_beta"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(8)
    n = 2400
    g = rng.integers(0, len(SLOPES), n)
    x = rng.normal(size=n)
    y = 0.5 + x * SLOPES[g] + rng.normal(0, 0.4, n)
    path = tmp_path_factory.mktemp("slopes") / "train.parquet"
    pq.write_table(pa.table({"g": g * 3 + 1, "x": x, "y": y}), path)
    return path


def settings(sparse: bool, **more) -> dict:
    return {
        "data.numeric": ["x"],
        "data.categorical": ["g"],
        "data.batch_size": 240,
        "model.link": "gaussian",
        "model.terms": [
            {"layer": "InterceptLayer", "name": "bias"},
            {
                "layer": "RandomSlopesLayer",
                "name": "s",
                "inputs": ["g"],
                "slopes": ["x"],
                "sparse": sparse,
            },
        ],
        "train.steps": 1500,
        "checkpoint.every": 1500,
        "optim.lr": 0.05,
        "mesh.data": 1,
        **more,
    }


def slopes_by_group(run) -> np.ndarray:
    """The fitted slope of each raw group 0..5 (the vocabulary orders groups by frequency)."""
    vocab = vocab_lib.load_all(run / "vocab", ["g"])["g"]
    raw = (vocab.values.to_numpy() - 1) // 3
    beta = load_params(run)[f"{SITE}.loc"][: len(raw), 0, 0]
    out = np.empty(len(SLOPES))
    out[raw] = beta
    return out


def test_dense_and_row_sparse_recover_the_slopes(dataset, tmp_path):
    fitted = {}
    for sparse in (False, True):
        run = tmp_path / str(sparse)
        loop.train(quiet_config(dataset, run, settings(sparse)), log=lambda _: None)
        fitted[sparse] = slopes_by_group(run)
    assert_allclose(fitted[False], SLOPES, atol=0.06)
    assert_allclose(fitted[True], fitted[False], atol=0.05)


def test_scores_through_the_cli(dataset, tmp_path):
    run = tmp_path / "run"
    loop.train(quiet_config(dataset, run, settings(True)), log=lambda _: None)
    scores = tmp_path / "scores"
    proc = run_cli("score", f"run_dir={run}", f"data.path={dataset}", f"output={scores}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(sorted(scores.glob("part-*.parquet"))[0])
    data = pq.read_table(dataset).slice(0, table.num_rows)
    g = (data["g"].to_numpy() - 1) // 3
    expected = 0.5 + data["x"].to_numpy() * SLOPES[g]
    assert np.abs(table["mean"].to_numpy() - expected).max() < 0.2


def test_the_table_shards_over_the_model_axis(dataset, tmp_path):
    cfg = quiet_config(dataset, tmp_path / "run", settings(True, **{"mesh.data": 4}))
    cfg.mesh.model = 2
    setup = train_setup.make_setup(cfg, {"g": len(SLOPES)}, 2400, ShardingPlan.from_config(cfg))
    assert SITE in setup.sparse
    for leaf in jax.tree.leaves(setup.shardings.params[SITE]):
        assert leaf.spec[0] == "model", leaf.spec


def test_a_slopes_term_without_slopes_is_refused(dataset, tmp_path):
    cfg = quiet_config(dataset, tmp_path / "run", settings(False))
    cfg.model.terms = [{"layer": "RandomSlopesLayer", "name": "s", "inputs": ["g"]}]
    with pytest.raises(ConfigError, match=r"model.terms\[s\].*'slopes'"):
        loop.train(cfg, log=lambda _: None)
