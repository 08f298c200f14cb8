"""train/daily.py: the drifting world it trains on, day by day, and each day's run settings
(a day continues the previous day's run)."""

from __future__ import annotations

import numpy as np

from train import daily


def test_each_day_users_drift_a_fifth_leave_and_new_ones_arrive():
    world = daily.World(seed=3)
    before = dict(world.effects)
    active = set(world.active)
    world.next_day()
    steps = np.array([world.effects[u] - before[u] for u in before])
    assert abs(steps.std() - daily.DRIFT) < 0.05 and abs(steps.mean()) < 0.05
    new = set(world.active) - active
    assert len(new) == daily.NEW_USERS and min(new) == daily.START_USERS
    stayed = len(set(world.active) & active) / len(active)
    assert abs(stayed - (1 - daily.LEAVING)) < 0.06
    day = world.sample(5_000)
    assert set(day["user"].to_pylist()) <= {f"u{u:05d}" for u in world.active}
    x, y = day["x"].to_numpy(), day["y"].to_numpy()
    effect = np.array([world.effects[int(u[1:])] for u in day["user"].to_pylist()])
    resid = y - 0.2 - 0.5 * x - effect
    assert abs(resid.std() - 0.5) < 0.03  # the day's noise, nothing else


def test_a_later_day_continues_the_previous_days_run(tmp_path):
    first = daily.settings(tmp_path / "d1.parquet", tmp_path / "day1", 100, None)
    later = daily.settings(tmp_path / "d2.parquet", tmp_path / "day2", 100, tmp_path / "day1")
    assert "init_from" not in first and later["init_from"] == str(tmp_path / "day1")
    assert {k: v for k, v in later.items() if k not in ("init_from", "run_dir", "data.path")} == {
        k: v for k, v in first.items() if k not in ("run_dir", "data.path")
    }
