"""train/synth.py: the embedded default data and the crossed-effects simulator are
deterministic and carry the truth they were drawn from."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from train import synth


def test_the_default_data_is_a_function_of_its_seed_and_writes_its_truth(tmp_path):
    a = synth.generate(tmp_path / "a" / "train.parquet", rows=5_000, seed=3)
    b = synth.generate(tmp_path / "b" / "train.parquet", rows=5_000, seed=3)
    ta, tb = (pq.read_table(tmp_path / d / "train.parquet") for d in "ab")
    assert ta.equals(tb) and a == b
    truth = json.loads((tmp_path / "a" / "truth.json").read_text())
    assert truth == json.loads(json.dumps(a))
    assert truth["intercept"] == synth.INTERCEPT and truth["beta"] == synth.BETA
    assert truth["effect_sd"] == {name: sd for name, (_, _, sd) in synth.FIELDS.items()}
    assert set(ta.column_names) == {"row_id", "user", "item", "region", "x1", "x2", "x3", "x4", "y"}
    assert set(np.unique(ta["y"].to_numpy())) <= {0, 1}
    assert 0.05 < truth["positive_rate"] < 0.95
    synth.generate(tmp_path / "c" / "t.parquet", 5_000, seed=4)
    assert not pq.read_table(tmp_path / "c" / "t.parquet").equals(ta)


def test_crossed_effects_hold_the_levels_and_the_truth_asked_for(tmp_path):
    cols = synth.crossed_effects(
        tmp_path / "d.parquet",
        20_000,
        {"g": 50, "h": 7},
        {"g": 0.5, "h": 0.0},
        "gaussian",
        intercept=2.0,
        slope=-1.0,
        seed=1,
    )
    assert cols["g"].max() < 50 and cols["h"].max() < 7
    # with h's sd at 0 the target is 2 - x + g's effect + N(0, 1): the fit recovers them
    design = np.column_stack([np.ones(20_000), cols["x"]])
    resid = cols["y"] - design @ np.linalg.lstsq(design, cols["y"], rcond=None)[0]
    assert abs(np.linalg.lstsq(design, cols["y"], rcond=None)[0][1] + 1.0) < 0.05
    assert 1.0 < resid.var() < 1.0 + 0.5**2 + 0.1
    with pytest.raises(ValueError, match="link 'probit' is not one of"):
        synth.crossed_effects(tmp_path / "e.parquet", 10, {"g": 2}, {"g": 1.0}, "probit")


def test_crossed_terms_are_an_intercept_a_slope_and_a_table_per_column():
    assert synth.crossed_terms(["g", "h"], ["x"]) == [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "AdaptiveLayer", "name": "x", "inputs": ["x"]},
        {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"]},
        {"layer": "RandomEffectsLayer", "name": "h", "inputs": ["h"]},
    ]
