"""A run directory's restore-or-init (``train/run.py``), shared by training, the summary,
scoring and the API."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.service_helpers import small_config, small_dataset
from train import loop
from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.run import RunDir, restore_run
from train.setup import fresh_state


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_a_run_without_checkpoints_starts_fresh_and_a_named_step_is_refused(tmp_path):
    run = RunDir(tmp_path / "empty")
    assert run.resume_point(None, False, print) == (None, None)
    with pytest.raises(ConfigError, match=r"train\.resume_step=5: .* holds no checkpoint"):
        run.resume_point(5, False, print)


def test_training_the_summary_and_a_fresh_start_read_the_run_one_way(tmp_path):
    cfg = small_config(small_dataset(tmp_path), tmp_path / "r", **{"mesh.data": 1})
    loop.train(cfg, log=lambda _: None)
    run = RunDir(tmp_path / "r")
    step, meta = run.resume_point(None, False, lambda _: None)
    assert step == 20 and meta["config"]["train"]["steps"] == 20
    setup, state, opened = restore_run(tmp_path / "r", log=lambda _: None)
    assert opened["step"] == 20
    # the restore that training does gives the state the summary opens, leaf for leaf
    again, _, restored = run.restore(setup, step, True, lambda _: None)
    assert again == 20
    for a, b in zip(_leaves(state), _leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    # an older step asked for by name is that step
    ten, _, older = run.restore(setup, 10, True, lambda _: None)
    assert ten == 10 and int(older.step) == 10
    # no step: the setup's fresh state, the one a new run starts from
    none, meta, fresh = run.restore_or_init(setup, None, False, lambda _: None)
    assert none is None and meta is None
    for a, b in zip(_leaves(fresh), _leaves(fresh_state(setup)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path):
    data = small_dataset(tmp_path)
    loop.train(small_config(data, tmp_path / "r", **{"mesh.data": 1}), log=lambda _: None)
    setup, _, _ = restore_run(tmp_path / "r", log=lambda _: None)
    other = small_config(data, tmp_path / "o", **{"mesh.data": 1, "model.link": "gaussian"})
    loop.train(other, log=lambda _: None)
    other_setup, _, _ = restore_run(tmp_path / "o", log=lambda _: None)
    with pytest.raises(
        CheckpointError, match=r"different model structure \(sites differ: \['sigma'\]\)"
    ):
        RunDir(tmp_path / "r").restore(other_setup, 20, True, lambda _: None)
    assert setup.fingerprint != other_setup.fingerprint
