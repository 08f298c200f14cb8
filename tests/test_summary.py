"""train/summary.py: a global site's summary against its guide's closed form, coefficients
labelled by their input columns, and the CSV written whole."""

from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from tests.service_helpers import quiet_config
from train.plan import ShardingPlan
from train.setup import fresh_state, make_setup
from train.summary import FIELDS, format_rows, summary_rows, write_csv

TERMS = [
    {"layer": "InterceptLayer", "name": "bias"},
    {"layer": "AdaptiveLayer", "name": "w", "inputs": ["price", "age"]},
    {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
]


def _softplus_inverse(sd: float) -> float:
    return float(np.log(np.expm1(sd)))


def test_draws_match_the_guides_closed_form_and_name_the_columns(tmp_path):
    cfg = quiet_config(
        tmp_path / "d.parquet",
        tmp_path / "run",
        {
            "data.numeric": ["price", "age"],
            "data.categorical": ["user"],
            "data.batch_size": 8,
            "model.terms": TERMS,
            "optim.guide": "mean_field",
        },
    )
    setup = make_setup(cfg, {"user": 4}, 100, ShardingPlan.from_config(cfg))
    state = fresh_state(setup)
    params = jax.device_get(state.params)
    params["InterceptLayer_bias_beta"] = {
        "loc": jnp.full((1, 1), 1.5),
        "raw_scale": jnp.full((1, 1), _softplus_inverse(0.2)),
    }
    params["RandomEffectsLayer_user_scale"] = {  # log-normal: λ = exp(u), u ~ N(-1, 0.3)
        "loc": jnp.asarray(-1.0),
        "raw_scale": jnp.asarray(_softplus_inverse(0.3)),
    }
    rows = summary_rows(setup, state._replace(params=params), draws=20_000, seed=1)
    by = {(r["site"], r["index"]): r for r in rows}
    assert not any("theta" in site for site, _ in by)  # tables are not global

    bias = by[("InterceptLayer_bias_beta", "0,0")]
    assert abs(bias["mean"] - 1.5) < 0.01 and abs(bias["std"] - 0.2) < 0.01
    assert abs(bias["q05"] - (1.5 - 1.6449 * 0.2)) < 0.015
    scale = by[("RandomEffectsLayer_user_scale", "")]
    law = stats.lognorm(0.3, scale=np.exp(-1.0))
    assert abs(scale["mean"] - law.mean()) < 0.01 and abs(scale["q95"] - law.ppf(0.95)) < 0.015
    labels = [by[("AdaptiveLayer_w_beta", f"{i},0")]["label"] for i in range(2)]
    assert labels == ["price", "age"]

    write_csv(rows, tmp_path / "summary.csv")
    with open(tmp_path / "summary.csv") as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == FIELDS and len(read) == len(rows)
    assert len(format_rows(rows).splitlines()) == len(rows) + 2  # a header, a rule, the rows
