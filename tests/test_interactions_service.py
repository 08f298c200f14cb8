"""HorseshoeInteractionLayer and MixtureLayer in the service: HorseshoeInteractionLayer,
declared in model.terms with or without z_inputs, trains, summarizes and scores through the
command line and finds the one real pair among the pairs of its inputs; a MixtureLayer term
takes its components by name from the config, and a bad setting is a config error naming
the term."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import load_params, quiet_config, run_cli
from train import loop
from train.config import ConfigError
from train.summary import summarize

SITE = "HorseshoeInteractionLayer_hx_beta"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(5)
    n = 3000
    a, b, c, w = (rng.normal(size=n).astype(np.float32) for _ in range(4))
    y = 0.3 + 1.0 * a * c + 0.5 * w + rng.normal(0, 0.5, n)  # pairs (a, b), (a, c), (b, c)
    path = tmp_path_factory.mktemp("hx") / "train.parquet"
    pq.write_table(pa.table({"a": a, "b": b, "c": c, "w": w, "y": y.astype(np.float32)}), path)
    return path


def settings(**more) -> dict:
    return {
        "data.numeric": ["a", "b", "c", "w"],
        "data.categorical": [],
        "data.batch_size": 250,
        "model.link": "gaussian",
        "model.terms": [
            {"layer": "InterceptLayer", "name": "bias"},
            {"layer": "AdaptiveLayer", "name": "main", "inputs": ["w"]},
            {
                "layer": "HorseshoeInteractionLayer",
                "name": "hx",
                "inputs": ["a", "b", "c"],
                "tau0": 0.1,
            },
        ],
        "train.steps": 1200,
        "checkpoint.every": 1200,
        "optim.lr": 0.02,
        "mesh.data": 1,
        **more,
    }


def test_the_real_pair_is_found_and_scored_through_the_cli(dataset, tmp_path):
    run = tmp_path / "run"
    loop.train(quiet_config(dataset, run, settings()), log=lambda _: None)
    beta = load_params(run)[f"{SITE}.loc"][:, 0]
    assert beta.shape == (3,)
    assert abs(beta[1] - 1.0) < 0.1 and np.abs(beta[[0, 2]]).max() < 0.1, beta
    sites = {r["site"] for r in summarize(run, draws=500)}
    assert {"HorseshoeInteractionLayer_hx_tau", SITE} <= sites
    scores = tmp_path / "scores"
    proc = run_cli("score", f"run_dir={run}", f"data.path={dataset}", f"output={scores}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table, data = pq.read_table(scores), pq.read_table(dataset)
    expected = 0.3 + data["a"].to_numpy() * data["c"].to_numpy() + 0.5 * data["w"].to_numpy()
    assert np.abs(table["mean"].to_numpy() - expected).mean() < 0.1
    assert "pairs([a, b, c])·β_hx" in (run / "model.txt").read_text()


def test_between_two_sets_with_z_inputs(dataset, tmp_path):
    terms = settings()["model.terms"]
    terms[2] = {**terms[2], "inputs": ["a", "b"], "z_inputs": ["c"]}
    run = tmp_path / "run"
    cfg = quiet_config(dataset, run, settings(**{"model.terms": terms, "train.steps": 600}))
    loop.train(cfg, log=lambda _: None)
    beta = load_params(run)[f"{SITE}.loc"][:, 0]  # (a c), (b c)
    assert beta.shape == (2,) and beta[0] > 0.8 and abs(beta[1]) < 0.15, beta


def test_a_mixture_prior_term_trains_through_the_config(dataset, tmp_path):
    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {
            "layer": "MixtureLayer",
            "name": "mix",
            "inputs": ["a", "b", "w"],
            "component_dists": ["Normal", "Laplace"],
            "component_kwargs": [{"loc": 0.0, "scale": 0.1}, {"loc": 0.0, "scale": 1.0}],
        },
    ]
    run = tmp_path / "run"
    cfg = quiet_config(dataset, run, settings(**{"model.terms": terms, "train.steps": 600}))
    loop.train(cfg, log=lambda _: None)
    beta = load_params(run)["MixtureLayer_mix_beta.loc"][:, 0]  # a, b, w: 0, 0, 0.5
    assert abs(beta[2] - 0.5) < 0.1 and np.abs(beta[:2]).max() < 0.1, beta
    rows = {r["site"] for r in summarize(run, draws=300)}
    assert "MixtureLayer_mix_logits" in rows
    bad = [*terms[:1], {**terms[1], "weights": [0.5, 0.6]}]
    with pytest.raises(ConfigError, match=r"model.terms\[mix\].*summing to 1"):
        loop.train(
            quiet_config(dataset, tmp_path / "bad", settings(**{"model.terms": bad})),
            log=lambda _: None,
        )
