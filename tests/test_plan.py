"""The sharding plan (``train/plan.py``): one object places everything, from logical axes."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from tests.service_helpers import small_config, small_dataset
from train import loop
from train import setup as train_setup
from train.config import Config, ConfigError
from train.plan import ShardingPlan
from train.run import restore_run

REPO = Path(__file__).resolve().parent.parent
SIZES = {"user": 300, "item": 60, "region": 9}


def _plan(mesh: dict, rules: list) -> ShardingPlan:
    cfg = OmegaConf.structured(Config)
    cfg.mesh = mesh
    cfg.sharding.rules = rules
    return ShardingPlan.from_config(cfg)


def test_a_new_mesh_axis_is_one_config_line_and_one_rule(tmp_path):
    """A ``replica`` axis that also splits the batch: the run trains on 8 devices with the
    batch split 4 ways and the tables 2 ways, and reaches the posterior of the same split
    written with two axes."""
    assert jax.device_count() == 8
    path = small_dataset(tmp_path)
    two_axes = small_config(path, tmp_path / "two", **{"mesh.data": 4, "mesh.model": 2})
    three_axes = small_config(
        path,
        tmp_path / "three",
        **{
            "mesh.data": 2,
            "mesh.model": 2,
            "mesh.replica": 2,  # the one config line ...
            # ... and the one rule (the table rule is the default's)
            "sharding.rules": [["batch", ["replica", "data"]], ["categories", "model"]],
        },
    )
    plan = ShardingPlan.from_config(three_axes)
    assert dict(plan.mesh.shape) == {"data": 2, "model": 2, "replica": 2}
    assert plan.batch_axes == ("replica", "data") and plan.batch_ways == 4
    assert plan.table_multiple == 2
    assert plan.batch.spec == jax.sharding.PartitionSpec(("replica", "data"))

    loop.train(two_axes, log=lambda _: None)
    loop.train(three_axes, log=lambda _: None)  # checks every leaf is placed as planned
    _, a, _ = restore_run(tmp_path / "two", log=lambda _: None)
    _, b, _ = restore_run(tmp_path / "three", log=lambda _: None)
    table = b.params["RandomEffectsLayer_user_theta"]["loc"]
    assert table.sharding.spec == jax.sharding.PartitionSpec("model")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-5)


def test_mesh_axes_and_rules_are_checked_naming_the_key():
    with pytest.raises(ConfigError, match=r"mesh\.replica=2: no sharding rule uses this axis"):
        _plan({"data": -1, "model": 1, "replica": 2}, [["categories", "model"]])
    with pytest.raises(ConfigError, match=r"sharding\.rules: .*names mesh axis 'modle'"):
        _plan({"data": -1, "model": 1}, [["categories", "modle"]])
    with pytest.raises(ConfigError, match=r"must be a \(logical_axis, mesh_axes\) pair"):
        _plan({"data": -1, "model": 1}, [["categories"]])
    with pytest.raises(ConfigError, match=r"mesh: .*needs 9 devices"):
        _plan({"data": 3, "model": 3}, [["categories", "model"]])
    plan = _plan({"data": -1, "model": 2}, [["categories", "model"]])
    with pytest.raises(ConfigError, match=r"data\.batch_size=6 is not divisible by the 4"):
        plan.check_batch_size(6)
    plan.check_batch_size(8)


def test_without_a_batch_rule_the_batch_goes_over_data_and_rules_can_replicate_all():
    plan = _plan({"data": -1, "model": 1}, [])
    assert plan.batch_axes == ("data",) and plan.batch_ways == 8 and plan.table_multiple == 1
    tables = _plan({"data": 1, "model": -1}, [["categories", "model"]])
    assert tables.batch_ways == 1 and tables.table_multiple == 8


def test_optimizer_moments_follow_their_parameters_whatever_their_names(tmp_path):
    """Each moment takes its parameter's sharding through the optimizer's own ``init``; a
    state leaf that mirrors no parameter is refused, not silently replicated."""
    cfg = small_config(small_dataset(tmp_path), tmp_path / "r", **{"mesh.model": 4})
    plan = ShardingPlan.from_config(cfg)
    setup = train_setup.make_setup(cfg, SIZES, 4000, plan)
    spec = jax.sharding.PartitionSpec("model")
    table = setup.shardings.params["RandomEffectsLayer_user_theta"]
    assert table["loc"].spec == spec

    def renamed(inner: optax.GradientTransformation) -> optax.GradientTransformation:
        # the moments under keys that name no site or field: matching by names would fail
        def init(params):
            return {"first": inner.init(params)}

        def update(updates, state, params=None):
            out, new = inner.update(updates, state["first"], params)
            return out, {"first": new}

        return optax.GradientTransformation(init, update)

    abstract = jax.eval_shape(lambda: setup.abstract)
    opt = renamed(optax.adam(0.1))
    params = abstract.params
    abstract = abstract._replace(opt_state=jax.eval_shape(opt.init, params))
    shardings = plan.state_shardings(abstract, setup.guide, opt)
    moments = shardings.opt_state["first"][0]
    assert moments.mu["RandomEffectsLayer_user_theta"]["loc"].spec == spec
    assert moments.nu["RandomEffectsLayer_user_theta"]["raw_scale"].spec == spec
    assert moments.count.spec == jax.sharding.PartitionSpec()

    def table_sized(params):  # a state leaf of a table's size that is not the parameter tree
        return {"rows": jnp.zeros((SIZES["user"] + 4, 2))}

    odd = optax.GradientTransformation(table_sized, lambda u, s, p=None: (u, s))
    abstract = abstract._replace(opt_state=jax.eval_shape(odd.init, params))
    with pytest.raises(ValueError, match="mirrors no guide parameter"):
        plan.state_shardings(abstract, setup.guide, odd)


def test_a_run_restores_on_fewer_table_ways_than_it_was_padded_for(tmp_path):
    """A run padded for 4 table ways, restored where its own mesh is refused, falls back to a
    mesh whose table axis divides the padding and whose batch axis takes the rest."""
    cfg = small_config(small_dataset(tmp_path), tmp_path / "r", **{"mesh.model": 4})
    restore_cfg = OmegaConf.merge(cfg, {"mesh": {"data": 3, "model": 3}})  # 9 devices: refused
    plan = ShardingPlan.for_restore(restore_cfg, 4)
    assert dict(plan.mesh.shape) == {"data": 2, "model": 4}
    plan = ShardingPlan.for_restore(restore_cfg, 6)
    assert dict(plan.mesh.shape) == {"data": 4, "model": 2}


def test_no_mesh_axis_name_is_written_outside_the_plan():
    """Mesh axes are named by the config and the rules only: the service's code places
    arrays through the plan."""
    pattern = re.compile(r"PartitionSpec\(\s*[\"']|\.shape\[\s*[\"']|make_mesh\(|Mesh\(")
    offenders = [
        f"{path.name}:{i}"
        for path in sorted((REPO / "train").glob("*.py"))
        if path.name != "plan.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
