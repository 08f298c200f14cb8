"""The structured guide's coupling of the globals at a learning rate three times the default.

A regression on 15 strongly correlated inputs, fitted through the service with the default
(conditional) guide at ``optim.lr=0.03``. The globals' coupling learns at 3% of the rate
(``optim.coupling_lr_factor``, default 0.03): the noise scale and the coefficients' posterior
sds must then match the exact posterior. At the full rate (factor 1) the coupling's noisy
steps carried the fit away and sigma came out several times too large with one draw per
step; that run is the control here, so the test fails if the slower rate stops mattering or
stops working. (With the antithetic pair, the default since, the full rate's sigma is 0.47
for a true 0.3: less noise, still carried away.)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from tests.service_helpers import quiet_config
from train import loop
from train.config import Config, to_container
from train.settings import changed_settings
from train.summary import summarize

D, N, SIGMA = 15, 2000, 0.3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("coupling") / "train.parquet"
    return path, simulate(path)


def simulate(path) -> np.ndarray:
    """Writes the data to ``path``; returns the exact posterior sds, intercept first."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D))
    x[:, 1:] += 0.9 * x[:, :1]  # every input correlated with the first
    beta = rng.normal(size=D) * 0.5
    y = 0.5 + x @ beta + rng.normal(0, SIGMA, N)
    columns = {f"x{j}": x[:, j].astype(np.float32) for j in range(D)}
    pq.write_table(pa.table({**columns, "y": y.astype(np.float32)}), path)
    design = np.column_stack([np.ones(N), x])
    # the exact posterior sds of the intercept and coefficients given sigma (flat prior: with
    # 2,000 rows the priors' pull is far below the tolerance)
    return np.sqrt(np.diag(np.linalg.inv(design.T @ design))) * SIGMA


def fit(
    path,
    run,
    factor: float,
    steps: int,
    lr: float = 0.03,
    guide: str = "conditional",
    antithetic: bool = True,
) -> dict[str, np.ndarray]:
    """The service's fit (also ``benchmarks/coupling_rate.py``'s): each global site's
    ``(mean, std)`` per element, from 2,000 guide draws."""
    inputs = [f"x{j}" for j in range(D)]
    settings = {
        "data.numeric": inputs,
        "data.categorical": [],
        "data.batch_size": 250,
        "model.link": "gaussian",
        "model.terms": [
            {"layer": "InterceptLayer", "name": "bias"},
            {"layer": "AdaptiveLayer", "name": "w", "inputs": inputs},
        ],
        "train.steps": steps,
        "checkpoint.every": steps,
        "optim.lr": lr,
        "optim.guide": guide,
        "optim.coupling_lr_factor": factor,
        "optim.antithetic": antithetic,
        "mesh.data": 1,
    }
    loop.train(quiet_config(path, run, settings), log=lambda _: None)
    rows = summarize(run, draws=2000)
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(r["site"], []).append((r["mean"], r["std"]))
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.slow
def test_the_slow_coupling_reaches_the_exact_posterior_and_the_full_rate_does_not(data, tmp_path):
    path, exact = data
    slow = fit(path, tmp_path / "slow", 0.03, 3000)
    sigma = slow["sigma"][0, 0]
    assert abs(sigma - SIGMA) < 0.03, sigma
    sites = ("InterceptLayer_bias", "AdaptiveLayer_w")
    ratio = np.concatenate([slow[f"{s}_beta"][:, 1] for s in sites]) / exact
    assert ratio.min() > 0.8 and ratio.max() < 1.35, np.round(ratio, 2)  # measured 1.03-1.23

    full = fit(path, tmp_path / "full", 1.0, 1500, antithetic=False)
    assert full["sigma"][0, 0] > 2 * SIGMA, full["sigma"][0, 0]


def test_a_run_saved_before_the_rate_existed_resumes_at_the_full_rate():
    cfg = OmegaConf.structured(Config)
    saved = {"config": to_container(cfg)}
    del saved["config"]["optim"]["coupling_lr_factor"]
    lines: list[str] = []
    kept = loop.keep_saved_settings(cfg, saved, lines.append)
    assert kept.optim.coupling_lr_factor == 1.0 and cfg.optim.coupling_lr_factor == 0.03
    assert lines == [
        "resuming with optim.coupling_lr_factor=1.0, the setting this run was trained with"
    ]
    assert changed_settings(saved["config"], kept) == []
    # a run saved with the key keeps it as a setting: a change is named, not overridden
    saved["config"]["optim"]["coupling_lr_factor"] = 0.1
    assert loop.keep_saved_settings(cfg, saved, lines.append) is cfg
    assert changed_settings(saved["config"], cfg) == ["optim.coupling_lr_factor: 0.1 → 0.03"]
