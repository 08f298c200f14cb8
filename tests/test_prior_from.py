"""A run whose prior is a trained run's posterior (``prior_from``), through the service: day 1
then day 2 this way against one run on both days, on a gaussian random-effects model (the
library's exact identity is in tests/test_posterior_prior.py); exact resume; the prior kept
with the run; row-sparse rows that day 2 never sees keep day 1's posterior; bad settings
refused naming the key."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import load_params, quiet_config, refusal, run_cli
from tests.test_warm_start import day, level_effects, settings
from train import loop
from train.config import ConfigError
from train.run import restore_run
from train.state import guide_params
from train.vocab import load_all

GLOBALS = ("InterceptLayer_bias_beta", "AdaptiveLayer_w_beta", "RandomEffectsLayer_user_scale")
STEPS = 1500


def logit_day(path, users: list[str], effects: dict[str, float], rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    user = rng.choice(users, rows)
    x = rng.normal(size=rows).astype(np.float32)
    eta = -0.3 + 0.8 * x + np.array([effects[u] for u in user])
    y = (rng.random(rows) < 1 / (1 + np.exp(-eta))).astype(np.float32)
    pq.write_table(pa.table({"user": user, "x": x, "y": y}), path)


def write_days(root, link: str) -> tuple:
    """Day 1: users u000-u059; day 2: u020-u089 (30 new, 20 gone); and both together."""
    rng = np.random.default_rng(0)
    spread, rows, write = (0.5, 3000, day) if link == "gaussian" else (0.7, 6000, logit_day)
    effects = {f"u{i:03d}": float(rng.normal(0, spread)) for i in range(90)}
    first, second, both = (root / f"{link}-{n}.parquet" for n in ("day1", "day2", "both"))
    write(first, [f"u{i:03d}" for i in range(60)], effects, rows, 1)
    write(second, [f"u{i:03d}" for i in range(20, 90)], effects, rows, 2)
    pq.write_table(pa.concat_tables([pq.read_table(first), pq.read_table(second)]), both)
    return first, second, both


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    return write_days(tmp_path_factory.mktemp("prior_days"), "gaussian")


def train(data, run, **more):
    more = {"train.steps": STEPS, "checkpoint.every": STEPS, **more}
    loop.train(quiet_config(data, run, settings(**more)), log=lambda _: None)


def marginals(run) -> dict[str, tuple[float, float]]:
    setup, state, _ = restore_run(run, log=lambda _: None)
    params = guide_params(state.params)
    out = {}
    for site in GLOBALS:
        mean, sd = setup.guide.marginal(site, params[site])
        out[site] = (float(np.ravel(mean)[0]), float(np.ravel(sd)[0]))
    return out


def day1_day2_joint(days, root, **more):
    train(days[0], root / "day1", **more)
    train(days[1], root / "day2", prior_from=str(root / "day1"), **more)
    train(days[2], root / "joint", **more)
    return root


@pytest.fixture(scope="module")
def runs(days, tmp_path_factory):
    return day1_day2_joint(days, tmp_path_factory.mktemp("prior_runs"))


def test_day1_then_day2_matches_one_fit_of_both_days(runs):
    """Gaussian. Globals: means within a third of the joint fit's sd, sds within 0.8-1.25x of
    its (the coefficient's: 0.75x; measured 0.97x intercept, 0.85x coefficient, 1.0x scale).
    Users: every mean within half its joint sd (measured at most 0.38), every sd within
    0.8-1.25x (measured 0.86-1.10; the 20 users day 2 never saw 0.86-1.01)."""
    assert_matches_joint(runs)


@pytest.mark.slow
def test_a_logit_model_day1_then_day2_matches_one_fit_of_both_days(tmp_path):
    """Logit, 6,000 rows a day, the same bounds (measured: globals' means within 0.14 joint
    sds, sds 0.98-1.09x; users' means within 0.18, sds 0.84-1.16x)."""
    days = write_days(tmp_path, "logit")
    assert_matches_joint(day1_day2_joint(days, tmp_path, **{"model.link": "logit"}))


def assert_matches_joint(runs) -> None:
    sequential, joint = marginals(runs / "day2"), marginals(runs / "joint")
    for site in GLOBALS:
        (m_s, sd_s), (m_j, sd_j) = sequential[site], joint[site]
        assert abs(m_s - m_j) < sd_j / 3, (site, m_s, m_j, sd_j)
        low = 0.75 if site == "AdaptiveLayer_w_beta" else 0.8
        assert low < sd_s / sd_j < 1.25, (site, sd_s, sd_j)
    seq, both = (by_user(level_effects(runs / r)) for r in ("day2", "joint"))
    assert sorted(seq) == sorted(both) == [f"u{i:03d}" for i in range(90)]
    gap = {u: abs(seq[u][0] - both[u][0]) / both[u][1] for u in both}
    on_day2 = max(gap[f"u{i:03d}"] for i in range(20, 90))
    not_on_day2 = max(gap[f"u{i:03d}"] for i in range(20))
    assert on_day2 < 0.5, on_day2
    assert not_on_day2 < 0.5, not_on_day2
    widths = [seq[u][1] / both[u][1] for u in both]
    assert min(widths) > 0.8 and max(widths) < 1.25, (min(widths), max(widths))


def by_user(table) -> dict[str, tuple[float, float]]:
    columns = (table[c].to_pylist() for c in ("value", "mean", "sd"))
    rows = zip(*columns, strict=True)
    return {value: (mean, sd) for value, mean, sd in rows if value is not None}


def test_the_prior_is_kept_with_the_run_and_a_resume_is_exact(days, runs, tmp_path):
    """300 steps, then on to the end, equals the run made in one go: the resumed segment
    reads the prior back from <run_dir>/prior, not from day 1's directory (moved away)."""
    assert (runs / "day2" / "prior").is_dir()
    base = tmp_path / "day1"
    (runs / "day1").rename(base)
    try:
        split = tmp_path / "split"
        more = {"prior_from": str(base), "train.stop_after": 300, "checkpoint.every": 300}
        train(days[1], split, **more)
        moved = tmp_path / "day1-moved"
        base.rename(moved)
        train(days[1], split, prior_from=str(base))
        moved.rename(base)
        a, b = load_params(runs / "day2"), load_params(split)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    finally:
        base.rename(runs / "day1")


def test_row_sparse_rows_day2_never_sees_keep_day1s_posterior(days, runs, tmp_path):
    """The row-sparse path: rows day 2 never observes keep day 1's parameters bit for bit,
    and its globals agree with the dense path's day 2 (same bounds as against the joint)."""
    terms = settings()["model.terms"]
    terms[2] = {**terms[2], "sparse": True}
    train(days[0], tmp_path / "day1", **{"model.terms": terms})
    train(
        days[1], tmp_path / "day2", **{"model.terms": terms, "prior_from": str(tmp_path / "day1")}
    )
    sparse, dense = marginals(tmp_path / "day2"), marginals(runs / "day2")
    for site in GLOBALS:
        (m_s, sd_s), (m_d, sd_d) = sparse[site], dense[site]
        assert abs(m_s - m_d) < sd_d / 3, (site, m_s, m_d, sd_d)
        assert 0.8 < sd_s / sd_d < 1.25, (site, sd_s, sd_d)
    site = "RandomEffectsLayer_user_theta"
    before, after = load_params(tmp_path / "day1"), load_params(tmp_path / "day2")
    # known users keep their rows; day 2 has none of u000-u019
    values = load_all(tmp_path / "day1" / "vocab", ["user"])["user"].values.to_pylist()
    gone = [i for i, v in enumerate(values) if int(v[1:]) < 20]
    kept = [i for i, v in enumerate(values) if int(v[1:]) >= 20]
    for field in ("loc", "raw_scale"):
        np.testing.assert_array_equal(
            after[f"{site}.{field}"][gone], before[f"{site}.{field}"][gone]
        )
    assert not np.allclose(after[f"{site}.loc"][kept], before[f"{site}.loc"][kept])


def test_bad_prior_settings_are_refused_naming_the_key(days, runs, tmp_path):
    with pytest.raises(ConfigError, match=r"prior_from=.*nowhere"):
        train(days[1], tmp_path / "a", prior_from=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"prior_from=.* and init_from="):
        train(days[1], tmp_path / "b", prior_from=str(runs / "day1"), init_from=str(tmp_path))
    assert not (tmp_path / "b").exists()  # refused before anything was written
    proc = run_cli(
        "train",
        f"run_dir={tmp_path / 'c'}",
        f"data.path={days[1]}",
        f"prior_from={runs / 'day1'}",
        "prior_widen=0.5",
    )
    assert "prior_widen=0.5" in refusal(proc)
    assert not (tmp_path / "c").exists()
