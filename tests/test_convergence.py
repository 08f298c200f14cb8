"""Convergence: the tracker settles on noise around a fixed point, not on a trend hidden by a
decayed learning rate; its state resumes exactly; ``train.until: converged`` stops a run and
says so, and a resumed run stops at the same step with the same parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.service_helpers import load_params
from tests.test_recenter import crossed_config, crossed_data
from train import loop
from train.convergence import ConvergenceTracker, window_steps


def tracker(**kw) -> ConvergenceTracker:
    base = {
        "window": 100,
        "epoch_steps": 100.0,
        "base_lr": 0.01,
        "drift_tol": 0.1,
        "elbo_tol": 1e-3,
        "patience": 2,
    }
    return ConvergenceTracker(**{**base, **kw})


def feed(t: ConvergenceTracker, steps: range, loc, lr, rng, sd: float = 0.05) -> None:
    for s in steps:
        if s % 10:
            continue
        # an Adam iterate jitters by about one learning rate around where it is headed
        value = np.array([loc(s), 1.0]) + rng.normal(0, lr(s), 2)
        t.sample(s, -0.5 + rng.normal(0, 0.01), lr(s), {"beta": value}, {"beta": np.full(2, sd)})


def test_noise_around_a_fixed_point_converges(rng):
    t = tracker()
    feed(t, range(10, 1001), lambda s: 0.3, lambda s: 0.01, rng)
    # the first verdict comes at step 200; a 2-SE test flags pure noise now and then
    assert t.converged and 300 <= t.converged_at <= 500
    assert t.status() == f"converged at step {t.converged_at}"


def test_a_drifting_global_is_still_moving(rng):
    # 1e-4 per step: 0.01 per epoch, 0.2 posterior sds
    t = tracker()
    feed(t, range(10, 1001), lambda s: 1e-4 * s, lambda s: 5e-4, rng)
    assert not t.converged
    assert t.status().startswith("not converged: beta[0] still moving by 0.2 posterior sds")


def elbo_feed(t: ConvergenceTracker, gain_per_step: float, lr: float, rng) -> None:
    for s in range(10, 1001, 10):
        elbo = -0.5 + gain_per_step * s + rng.normal(0, 1e-5)
        t.sample(s, elbo, lr, {"beta": np.zeros(1)}, {"beta": np.ones(1)})


def test_an_elbo_rise_slowed_by_a_decayed_learning_rate_is_not_convergence(rng):
    # +2e-7 per row per step at lr 5e-4: 2e-5 per epoch, 4e-4 at the base rate of 0.01
    quiet = tracker(elbo_tol=1e-4)
    elbo_feed(quiet, 2e-7, 5e-4, rng)
    assert not quiet.converged and "the ELBO still rises" in quiet.status()
    flat = tracker(elbo_tol=1e-4)
    elbo_feed(flat, 0.0, 5e-4, rng)
    assert flat.converged


def test_a_run_with_too_few_windows_says_so(rng):
    t = tracker()
    feed(t, range(10, 101), lambda s: 0.0, lambda s: 0.01, rng)
    assert "too few windows" in t.status()


def test_state_round_trips_mid_window(rng):
    straight = tracker()
    feed(
        straight,
        range(10, 1001),
        lambda s: 0.3 + 1e-4 * s,
        lambda s: 0.01,
        np.random.default_rng(5),
    )
    first = tracker()
    feed(first, range(10, 551), lambda s: 0.3 + 1e-4 * s, lambda s: 0.01, np.random.default_rng(5))
    restored = ConvergenceTracker.from_json(json.loads(json.dumps(first.to_json())))
    # the same random stream continues where it left off
    rng5 = np.random.default_rng(5)
    for s in range(10, 551):
        if s % 10 == 0:
            rng5.normal(0, 0.01, 2), rng5.normal(0, 0.01)
    feed(restored, range(551, 1001), lambda s: 0.3 + 1e-4 * s, lambda s: 0.01, rng5)
    assert restored.to_json() == straight.to_json()


def test_window_is_one_epoch_in_whole_samples():
    assert window_steps(244.1, 10, None) == 250
    assert window_steps(12.0, 10, None) == 50  # at least 5 samples
    assert window_steps(244.1, 10, 400) == 400


@pytest.fixture(scope="module")
def crossed(tmp_path_factory):
    path = tmp_path_factory.mktemp("crossed") / "y.parquet"
    crossed_data(path, seed=2, mean=3.0, n=4000)
    return path


CONVERGE = {
    "train.until": "converged",
    "train.steps": 4000,
    "optim.schedule": "constant",
    "optim.recenter_every": 5,
    "checkpoint.every": 100,
}


def test_until_converged_stops_and_says_so(crossed, tmp_path):
    messages = []
    result = loop.train(crossed_config(crossed, tmp_path / "run", **CONVERGE), log=messages.append)
    assert result["converged_at"] is not None and result["step"] == result["converged_at"] < 4000
    assert not result["stopped_early"]
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["convergence"] == f"converged at step {result['step']}"
    assert any(m.startswith("converged at step") for m in messages)
    from train import report

    assert f"converged at step {result['step']}" in report.build(tmp_path / "run").read_text()


def test_fixed_steps_report_whether_they_converged(crossed, tmp_path):
    result = loop.train(
        crossed_config(crossed, tmp_path / "run", **{"train.steps": 40}), log=lambda _: None
    )
    assert result["step"] == 40 and result["convergence"].startswith("not converged")
    from train import report

    assert "not converged" in report.build(tmp_path / "run").read_text()


def test_resume_with_convergence_and_recentering_is_exact(crossed, tmp_path):
    straight = loop.train(crossed_config(crossed, tmp_path / "a", **CONVERGE), log=lambda _: None)
    half = straight["step"] // 2
    loop.train(
        crossed_config(crossed, tmp_path / "b", **{**CONVERGE, "train.stop_after": half}),
        log=lambda _: None,
    )
    resumed = loop.train(crossed_config(crossed, tmp_path / "b", **CONVERGE), log=lambda _: None)
    assert (
        resumed["step"] == straight["step"] and resumed["converged_at"] == straight["converged_at"]
    )
    a, b = load_params(tmp_path / "a"), load_params(tmp_path / "b")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize(
    "key,value",
    [
        ("train.until", "forever"),
        ("train.convergence.sample_every", 0),
        ("optim.guide", "full_rank"),
        ("optim.start", "median"),
        ("optim.recenter_every", -1),
    ],
)
def test_bad_posterior_settings_fail_before_the_data_is_read(crossed, tmp_path, key, value):
    with pytest.raises(loop.ConfigError, match=key.split(".")[-1]):
        loop.train(crossed_config(crossed, tmp_path / "run", **{key: value}), log=lambda _: None)
    assert not (tmp_path / "run" / "data").exists()
