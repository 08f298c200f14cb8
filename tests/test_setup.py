"""train/setup.py: what a job derives from its config, vocabulary and plan: padded tables,
a fingerprint that changes with the model and not with the run's length, and the learning
rate's scale after a rollback."""

from __future__ import annotations

import jax
import pytest

from tests.service_helpers import quiet_config
from train.config import ConfigError
from train.plan import ShardingPlan
from train.setup import (
    global_site_names,
    make_setup,
    table_padding,
    table_rows_of,
    with_lr_scale,
)

TERMS = [
    {"layer": "InterceptLayer", "name": "bias"},
    {"layer": "AdaptiveLayer", "name": "w", "inputs": ["x"]},
    {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
    {"layer": "FMLayer", "name": "fm", "inputs": ["user", "item"], "low_rank_dim": 2},
]


def _cfg(tmp_path, **settings):
    base = {
        "data.numeric": ["x"],
        "data.categorical": ["user", "item"],
        "data.batch_size": 64,
        "model.link": "logit",
        "model.terms": TERMS,
    }
    return quiet_config(tmp_path / "d.parquet", tmp_path / "run", {**base, **settings})


def _setup(cfg, pad=None):
    return make_setup(cfg, {"user": 10, "item": 5}, 1_000, ShardingPlan.from_config(cfg), pad)


def test_tables_are_padded_to_the_model_axis_and_keep_the_runs_padding(tmp_path):
    four = _cfg(tmp_path, **{"mesh.data": 2, "mesh.model": 4})
    setup = _setup(four)
    assert setup.pad_multiple == 4
    # 10 users + OOV → 12; the FM's one table of 11 + 6 rows → 20
    assert table_rows_of(setup) == {
        "RandomEffectsLayer_user_theta": 12,
        "CategoricalFMLayer_fm_theta": 20,
    }
    # restored on a mesh of 2 table shards, the run keeps its padding of 4
    two = _cfg(tmp_path, **{"mesh.data": 4, "mesh.model": 2})
    assert _setup(two, pad=4).pad_multiple == 4
    eight = ShardingPlan.from_config(_cfg(tmp_path, **{"mesh.data": 1, "mesh.model": 8}))
    with pytest.raises(ConfigError, match="padded to multiples of 4 rows, which cannot be split 8"):
        table_padding(eight, 4)


def test_the_fingerprint_follows_the_model_not_the_runs_length(tmp_path):
    base = _setup(_cfg(tmp_path)).fingerprint
    assert _setup(_cfg(tmp_path, **{"train.steps": 12345})).fingerprint == base
    assert _setup(_cfg(tmp_path, **{"model.link": "poisson"})).fingerprint != base
    assert _setup(_cfg(tmp_path, **{"optim.guide": "mean_field"})).fingerprint != base
    assert _setup(_cfg(tmp_path, **{"model.terms": TERMS[:3]})).fingerprint != base


def test_a_rollback_scales_the_rate_and_keeps_the_optimizer_state(tmp_path):
    cfg = _cfg(tmp_path, **{"optim.schedule": "constant", "optim.lr": 0.02})
    setup = _setup(cfg)
    slower = with_lr_scale(setup, cfg, 0.25)
    assert float(slower.schedule(0)) == pytest.approx(0.005) and slower.lr_scale == 0.25
    assert with_lr_scale(setup, cfg, 1.0) is setup
    params = setup.abstract.params
    same = jax.tree.structure(setup.optimizer.init(params))
    assert jax.tree.structure(slower.optimizer.init(params)) == same
    assert "InterceptLayer_bias_beta" in global_site_names(setup.sites)
    assert "RandomEffectsLayer_user_theta" not in global_site_names(setup.sites)
