"""The HTML report (train.report): figures for training, the global sites against the truth,
each table term, and the held-out fit, whose numbers match brute force."""

from __future__ import annotations

import base64
import io
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import score_cfg, small_config, small_dataset
from train import loop, report
from train import score as score_lib
from train.summary import summarize, write_csv


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data = small_dataset(tmp)
    run = tmp / "run"
    loop.train(small_config(data, run, **{"train.steps": 40}), log=lambda _: None)
    write_csv(summarize(run, draws=200), run / "summary.csv")
    score_lib.score(score_cfg(run, data, run / "scores"), log=lambda _: None)
    return run, data


def test_the_report_has_its_figures_and_the_held_out_fit(scored):
    run, _ = scored
    text = report.build(run).read_text()
    images = re.findall(r"<img alt='figure' src='data:image/png;base64,([^']+)'", text)
    # training, the global sites, one per table term (user, region, fm), the fit
    assert len(images) == 6, len(images)
    from PIL import Image

    for encoded in images:  # each a real picture: wide, and neither blank nor one colour
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("L"))
        assert picture.shape[1] >= 600 and picture.shape[0] >= 250, picture.shape
        assert picture.std() > 10 and (picture < 128).mean() > 0.005
    for term in ("user", "region", "fm"):
        assert f"<h3>{term}" in text
    scores = pq.read_table(run / "scores")
    p, y = scores["mean"].to_numpy(), scores["y"].to_numpy().astype(float)
    brier = np.mean((np.clip(p, 1e-6, 1 - 1e-6) - y) ** 2)
    assert f"Brier {brier:.4f}" in text


def test_the_run_writes_its_model_and_the_report_shows_it(scored):
    run, _ = scored
    text = (run / "model.txt").read_text()
    assert "θ_region ~ Normal(0, λ_region)" in text and "y_i ~ Bernoulli" in text
    assert "η_i = β_bias + [x1, x2, x3, x4]·β_dense + θ_user[user_i]" in text
    assert "\\begin{align}" in (run / "model.tex").read_text()
    page = report.build(run).read_text()
    assert "<h2>Model</h2>" in page and "θ_region ~ Normal(0, λ_region)" in page


def test_truth_json_beside_the_data_is_read_for_the_forest_plot(scored):
    run, _ = scored
    truth = report._truth(run)
    assert truth["intercept"] == -1.0 and truth["sd:user"] == 0.5 and truth["beta:0"] == 0.8
    row = {"site": "RandomEffectsLayer_region_scale", "index": ""}
    assert report._truth_of(row, truth) == 0.2
    assert report._truth_of({"site": "AdaptiveLayer_dense_beta", "index": "2,0"}, truth) == 0.3


def test_fit_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 1000)
    y = (rng.random(1000) < p).astype(float)
    got = report.fit_metrics(y, p, np.zeros_like(p))
    assert got["Brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert got["log score"] == pytest.approx(np.mean(np.log(np.where(y == 1, p, 1 - p))))
    m, s = rng.normal(size=500), rng.uniform(0.5, 2, 500)
    x = m + s * rng.normal(size=500)
    got = report.fit_metrics(x, m, s)
    assert got["RMSE"] == pytest.approx(np.sqrt(np.mean((x - m) ** 2)))
    dens = -0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
    assert got["mean log density"] == pytest.approx(dens.mean())


def test_pit_is_uniform_when_the_predictive_is_the_truth():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.95, 20_000)
    y = (rng.random(20_000) < p).astype(float)
    pit = report.predictive_pit(y, p, pa.table({"mean": p}))
    counts = np.histogram(pit, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts / 2000 - 1) < 0.1), counts
    m, s = rng.normal(size=20_000), rng.uniform(0.5, 2, 20_000)
    x = m + s * rng.normal(size=20_000)
    pit = report.predictive_pit(x, m, pa.table({"pred_std": s}))
    counts = np.histogram(pit, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts / 2000 - 1) < 0.1), counts
    assert report.predictive_pit(x, m, pa.table({"std": s})) is None  # no predictive sd


def test_without_matplotlib_the_report_keeps_its_tables(scored, monkeypatch):
    run, _ = scored
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    text = report.build(run).read_text()
    assert "<img" not in text and "pip install 'blayers[report]'" in text
    assert "RandomEffectsLayer_user_scale" in text and "Brier" in text
