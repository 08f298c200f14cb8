"""``train.non_finite``: a step with a non-finite loss or gradient is skipped exactly (nothing
changes), a run that keeps skipping stops, and a rollback restarts from the last good
checkpoint under a lower learning rate — equal, bit for bit, to a run resumed there by hand at
that rate — and keeps that rate when resumed."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.service_helpers import SMALL_TERMS, load_params, small_config, small_dataset
from train import checkpoint as ckpt
from train import data as data_lib
from train import dispatch, loop, pipeline, segments
from train import setup as train_setup
from train import step as step_lib
from train.config import ConfigError
from train.plan import ShardingPlan
from train.state import NonFiniteError

SETTINGS = {"train.steps": 40, "checkpoint.every": 10, "train.log_every": 5}
SPARSE_TERMS = [
    {**t, "sparse": True} if t["layer"] == "RandomEffectsLayer" else t for t in SMALL_TERMS
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("non_finite"))


def _poison(target, at=None):
    """The batch's target with a NaN in its first row (a host or a device array); with
    ``at``, a stacked batch's (``train.dispatch``) step ``at``'s first row."""
    index = 0 if at is None else (at, 0)
    if isinstance(target, np.ndarray):
        poisoned = target.copy()
        poisoned[index] = np.nan
        return poisoned
    return jax.device_put(target.at[index].set(jnp.nan), target.sharding)


def _poisoned_batches(monkeypatch, steps: set[int], times: int = 1) -> list[int]:
    """Feed a NaN target at the given (0-based) steps, the first ``times`` each is reached;
    returns the steps poisoned, in order."""
    original = segments.device_batches
    hits: list[int] = []

    def batches(store, cfg, prepare, shardings, first, total, *args):
        s = first
        for batch in original(store, cfg, prepare, shardings, first, total, *args):
            stacked = isinstance(batch, dispatch.Stacked)
            for at in range(len(batch["target"]) if stacked else 1):
                if s in steps and hits.count(s) < times:
                    hits.append(s)
                    poisoned = _poison(batch["target"], at if stacked else None)
                    batch = type(batch)({**batch, "target": poisoned})
                s += 1
            yield batch

    monkeypatch.setattr(segments, "device_batches", batches)
    return hits


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "row-sparse"])
def test_a_skipped_step_changes_nothing_but_the_step(data, tmp_path, sparse):
    overrides = {"model.terms": SPARSE_TERMS} if sparse else {}
    cfg = small_config(data, tmp_path / "run", **overrides)
    store, vocabs = data_lib.prepare(cfg.data, tmp_path / "run", "logit")
    sizes = {c: v.size for c, v in vocabs.items()}
    setup = train_setup.make_setup(cfg, sizes, store.num_rows, ShardingPlan.from_config(cfg))
    assert bool(setup.sparse) == sparse
    counts = {c: v.counts for c, v in vocabs.items()}
    step = step_lib.make_train_step(setup, counts, skip_non_finite=True)
    local = step.prepare(pipeline.StepBatches(store, 64, 0)(0))
    batch = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in local.items()}
    init = jax.jit(setup.init, out_shardings=setup.shardings)
    before = jax.device_get(init())

    after, loss = step(init(), {**batch, "target": _poison(batch["target"])})
    assert np.isnan(float(loss))
    assert int(after.step) == int(before.step) + 1
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(jax.device_get(after.params)),
        jax.tree_util.tree_leaves(before.params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    for a, b in zip(
        jax.tree_util.tree_leaves(jax.device_get(after.opt_state)),
        jax.tree_util.tree_leaves(before.opt_state),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)

    trained, loss = step(init(), batch)  # a finite batch is not held back by the guard
    unguarded, loss_u = step_lib.make_train_step(setup, counts)(init(), batch)
    assert np.isfinite(float(loss)) and float(loss) == float(loss_u)
    for a, b in zip(
        jax.tree_util.tree_leaves(jax.device_get(trained.params)),
        jax.tree_util.tree_leaves(jax.device_get(unguarded.params)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_a_run_that_skips_finishes_and_counts_its_skipped_steps(data, tmp_path, monkeypatch):
    hits = _poisoned_batches(monkeypatch, {3, 17, 18})
    cfg = small_config(data, tmp_path / "run", **SETTINGS, **{"train.non_finite.policy": "skip"})
    result = loop.train(cfg, log=lambda _: None)
    assert result["step"] == 40 and hits == [3, 17, 18]
    metrics = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped"] == 3
    assert all(np.all(np.isfinite(v)) for v in load_params(tmp_path / "run").values())


def test_a_run_that_keeps_skipping_stops_and_saves_nothing_after(data, tmp_path):
    cfg = small_config(
        data,
        tmp_path / "run",
        **SETTINGS,
        **{
            "optim.lr": 1e6,
            "optim.schedule": "constant",
            "train.non_finite.policy": "skip",
            "train.non_finite.max_skipped": 5,
        },
    )
    with pytest.raises(NonFiniteError, match=r"max_skipped=5.*nothing was saved past step"):
        loop.train(cfg, log=lambda _: None)
    for step in ckpt.steps(tmp_path / "run" / "checkpoints"):
        assert all(np.all(np.isfinite(v)) for v in load_params(tmp_path / "run", step).values())


def test_rollback_equals_a_run_resumed_by_hand_at_the_lower_rate(data, tmp_path, monkeypatch):
    """A NaN at step 25 (once): the run goes back to checkpoint 20 at half the rate and
    finishes. The same as stopping at 20 and resuming with optim.lr halved, bit for bit."""
    hits = _poisoned_batches(monkeypatch, {24})
    said = []
    cfg = small_config(
        data, tmp_path / "run", **SETTINGS, **{"train.non_finite.policy": "rollback"}
    )
    result = loop.train(cfg, log=said.append)
    assert result["step"] == 40 and hits == [24]
    assert any("rolled back to step 20" in s and "× 0.5" in s and "1 of 3" in s for s in said)
    _, meta = ckpt.read_meta(tmp_path / "run" / "checkpoints", 40)
    assert meta["lr_scale"] == 0.5 and meta["rollbacks"] == 1
    monkeypatch.undo()

    by_hand = tmp_path / "by_hand"
    loop.train(small_config(data, by_hand, **SETTINGS, **{"train.stop_after": 20}), print)
    lower = {"optim.lr": 0.005, "train.resume": "force"}
    loop.train(small_config(data, by_hand, **SETTINGS, **lower), log=lambda _: None)
    rolled, expected = load_params(tmp_path / "run"), load_params(by_hand)
    for name, value in expected.items():
        np.testing.assert_array_equal(rolled[name], value, err_msg=name)

    said.clear()  # a resumed run keeps the lower rate
    more = small_config(data, tmp_path / "run", **{**SETTINGS, "train.steps": 50})
    more.train.non_finite.policy = "rollback"
    loop.train(more, log=said.append)
    assert any("optim.lr × 0.5" in s for s in said), said


def test_rollbacks_run_out_and_the_run_stops(data, tmp_path, monkeypatch):
    _poisoned_batches(monkeypatch, {24}, times=10)  # the cause is not the learning rate
    said = []
    cfg = small_config(
        data,
        tmp_path / "run",
        **SETTINGS,
        **{"train.non_finite.policy": "rollback", "train.non_finite.max_rollbacks": 2},
    )
    with pytest.raises(NonFiniteError, match=r"step 2[5-9]|step 30"):
        loop.train(cfg, log=said.append)
    assert sum("rolled back to step 20" in s for s in said) == 2
    assert ckpt.steps(tmp_path / "run" / "checkpoints") == [20, 10]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.non_finite.policy", "ignore"),
        ("train.non_finite.max_skipped", 0),
        ("train.non_finite.lr_factor", 1.5),
        ("train.non_finite.max_rollbacks", 0),
    ],
)
def test_bad_non_finite_settings_are_refused_naming_the_key(data, tmp_path, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        loop.train(small_config(data, tmp_path / "run", **{key: value}), log=lambda _: None)
    assert not (tmp_path / "run").exists()
