"""A categorical FM recovers the scale of the interaction it was simulated with, under the
service's default guide (FM factors a Normal of their own, ``optim.fm_rows: free``;
train/guide_plan.py has the comparison against NUTS). With ``fm_rows: site`` this data gives
0.12 for a realized scale of 0.66."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import (
    SMALL_TERMS,
    crossed_config,
    load_params,
    small_config,
    small_dataset,
)
from train import loop
from train.config import with_saved_defaults
from train.summary import summarize

SCALE, RANK, USERS, ITEMS = 0.6, 2, 60, 20
FM_THETA = "CategoricalFMLayer_fm_theta"


@pytest.fixture(scope="module")
def interaction_data(tmp_path_factory):
    rng = np.random.default_rng(3)
    rows = 6000
    user, item = rng.integers(0, USERS, rows), rng.integers(0, ITEMS, rows)
    fu, fi = rng.normal(0, SCALE, (USERS, RANK)), rng.normal(0, SCALE, (ITEMS, RANK))
    pair = np.sum(fu[user] * fi[item], axis=1)
    y = 0.5 + rng.normal(0, 0.5, USERS)[user] + rng.normal(0, 0.3, ITEMS)[item] + pair
    y = y + rng.normal(0, 0.5, rows)
    path = tmp_path_factory.mktemp("fm") / "train.parquet"
    pq.write_table(pa.table({"user": user, "item": item, "y": y.astype(np.float32)}), path)
    return path, fu, fi


@pytest.mark.parametrize("fm_rows", ["free"])
def test_the_fm_scale_is_recovered(interaction_data, tmp_path, fm_rows):
    path, fu, fi = interaction_data
    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
        {"layer": "RandomEffectsLayer", "name": "item", "inputs": ["item"]},
        {"layer": "FMLayer", "name": "fm", "inputs": ["user", "item"], "low_rank_dim": RANK},
    ]
    settings = {"model.terms": terms, "optim.fm_rows": fm_rows, "train.steps": 2000}
    cfg = crossed_config(path, tmp_path / "run", ["user", "item"], **settings)
    loop.train(cfg, log=lambda _: None)
    rows = {r["site"]: r for r in summarize(tmp_path / "run", draws=2000)}
    scale = rows["CategoricalFMLayer_fm_scale"]
    # the simulated factors' own sd, the value the scale's posterior should centre on
    realized = float(np.sqrt(np.mean(np.concatenate([fu, fi]) ** 2)))
    assert abs(scale["mean"] - realized) < 0.15 * realized, (scale, realized)
    assert rows["RandomEffectsLayer_user_scale"]["mean"] == pytest.approx(0.5, rel=0.3)


def test_runs_saved_before_the_choice_keep_conditioned_factors_and_their_fingerprint():
    from train import checkpoint as ckpt
    from train.config import with_saved_defaults

    saved = {"optim": {"guide": "conditional", "lr": 0.01}}
    assert with_saved_defaults(saved)["optim"]["fm_rows"] == "site"
    assert with_saved_defaults({"optim": {"fm_rows": "free"}})["optim"]["fm_rows"] == "free"
    sites: dict = {}
    site_form = ckpt.fingerprint(sites, "logit", ["t"], "conditional", "site")
    assert site_form == ckpt.fingerprint(sites, "logit", ["t"], "conditional")  # as before
    assert ckpt.fingerprint(sites, "logit", ["t"], "conditional", "free") != site_form


@pytest.mark.parametrize("sparse", [False, True])
def test_factors_stored_without_the_unit_axis_train_the_same_numbers(tmp_path, sparse):
    # model.fm_unit_axis only changes how one unit's factors are stored: (rows, rank) against
    # (rows, rank, 1), the same numbers in the same order, so the same run to the bit
    data = small_dataset(tmp_path)
    terms = [dict(t) for t in SMALL_TERMS]
    terms[-1]["sparse"] = sparse  # the FM term
    params = {}
    for unit_axis in (True, False):
        run_dir = tmp_path / f"run_{unit_axis}"
        settings = {"model.terms": terms, "model.fm_unit_axis": unit_axis}
        loop.train(small_config(data, run_dir, **settings), log=lambda _: None)
        params[unit_axis] = load_params(run_dir)
    with_axis, without = params[True], params[False]
    assert with_axis[f"{FM_THETA}.loc"].shape == (*without[f"{FM_THETA}.loc"].shape, 1)
    assert sorted(with_axis) == sorted(without)
    for key, want in with_axis.items():
        np.testing.assert_array_equal(without[key].reshape(want.shape), want, err_msg=key)


def test_a_run_stored_with_the_unit_axis_resumes_and_is_continued_with_it(tmp_path):
    assert with_saved_defaults({"model": {"link": "logit"}})["model"]["fm_unit_axis"] is True
    data = small_dataset(tmp_path)
    base = tmp_path / "base"
    settings = {"model.fm_unit_axis": True, "train.steps": 10}
    loop.train(small_config(data, base, **settings), log=lambda _: None)
    lines: list[str] = []
    loop.train(small_config(data, base), log=lines.append)  # today's default, to step 20
    assert "resuming with model.fm_unit_axis=True, the setting this run was trained with" in lines
    assert load_params(base)[f"{FM_THETA}.loc"].shape[-1] == 1
    continued = tmp_path / "continued"
    loop.train(small_config(data, continued, init_from=str(base)), log=lambda _: None)
    assert load_params(continued)[f"{FM_THETA}.loc"].shape[-1] == 1
