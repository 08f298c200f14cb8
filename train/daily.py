"""Three days of drifting data, trained day by day (``make daily``).

Each day brings a partition of 20,000 rows: users' effects drift (each moves by a
Normal(0, 0.3) step a day), a fifth of the users leave and 100 new ones arrive. Day 1 trains
from scratch; days 2 and 3 continue the previous day's run on their own partition
(``init_from``, :mod:`train.warm_start`): known users keep their rows and posterior, new
ones get rows of their own. A model frozen on day 1 scores the same days for comparison.

Printed per day, for the users active that day: how far the posterior mean effects are from
the day's truth (RMSE, after removing the level that the intercept and the effects trade),
the share of 90% intervals that hold it, and the predictive RMSE on a held-out sample of the
day. Runs go to ``runs/daily/day{1,2,3}`` (and ``runs/daily/data``)::

    .venv/bin/python -m train.daily [--root runs/daily] [--steps 1500]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .api import Run, fit
from .frames import as_arrow

ROWS, HOLDOUT, START_USERS, NEW_USERS, LEAVING, DRIFT = 20_000, 4_000, 400, 100, 0.2, 0.3


class World:
    """The simulated truth: users' effects, drifting day by day."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.effects = dict(enumerate(self.rng.normal(0, 0.5, START_USERS)))
        self.active = list(self.effects)

    def next_day(self) -> None:
        for user in self.effects:
            self.effects[user] += float(self.rng.normal(0, DRIFT))
        stay = self.rng.random(len(self.active)) > LEAVING
        first = len(self.effects)
        for user in range(first, first + NEW_USERS):
            self.effects[user] = float(self.rng.normal(0, 0.5))
        self.active = [u for u, s in zip(self.active, stay, strict=True) if s]
        self.active += list(range(first, first + NEW_USERS))

    def sample(self, rows: int) -> pa.Table:
        user = self.rng.choice(self.active, rows)
        x = self.rng.normal(size=rows)
        effect = np.array([self.effects[u] for u in user])
        y = 0.2 + 0.5 * x + effect + self.rng.normal(0, 0.5, rows)
        names = np.array([f"u{u:05d}" for u in user])
        return pa.table({"user": names, "x": x.astype(np.float32), "y": y.astype(np.float32)})


def settings(data: Path, run_dir: Path, steps: int, init_from: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data.path": str(data),
        "data.numeric": ["x"],
        "data.categorical": ["user"],
        "data.batch_size": 1000,
        "model.link": "gaussian",
        "model.terms": [
            {"layer": "InterceptLayer", "name": "bias"},
            {"layer": "AdaptiveLayer", "name": "w", "inputs": ["x"]},
            {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
        ],
        "train.steps": steps,
        "train.progress": False,
        "checkpoint.every": steps,
    }
    if init_from is not None:
        out["init_from"] = str(init_from)
    return out


def judge(run: Run, world: World, holdout: pa.Table) -> dict[str, float]:
    """Effects against the day's truth for its active users, and predictive RMSE."""
    table = as_arrow(run.effects("user"))
    by_value = {v: i for i, v in enumerate(table["value"].to_pylist())}
    active = [f"u{u:05d}" for u in world.active]
    truth = np.array([world.effects[u] for u in world.active])
    mean, low, high = (table[c].to_numpy() for c in ("mean", "q05", "q95"))
    idx = np.array([by_value.get(u, -1) for u in active])
    seen = idx >= 0
    est = np.where(seen, mean[idx], 0.0)  # a user the run never saw: the prior's mean
    shift = float(np.mean(est[seen] - truth[seen])) if seen.any() else 0.0
    rmse = float(np.sqrt(np.mean((est - shift - truth) ** 2)))
    held = seen & (low[idx] - shift <= truth) & (truth <= high[idx] - shift)
    predicted = as_arrow(run.predict(holdout.drop(["y"])))["mean"].to_numpy()
    pred = float(np.sqrt(np.mean((predicted - holdout["y"].to_numpy()) ** 2)))
    return {"effects_rmse": rmse, "coverage": float(held.mean()), "pred_rmse": pred}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="runs/daily")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    root = Path(args.root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    world = World()
    rows, previous, frozen = [], None, None
    for day in (1, 2, 3):
        if day > 1:
            world.next_day()
        data, holdout = root / "data" / f"day{day}.parquet", world.sample(HOLDOUT)
        pq.write_table(world.sample(ROWS), data)
        run = fit(settings(data, root / f"day{day}", args.steps, previous))
        frozen = frozen or run
        daily, stale = judge(run, world, holdout), judge(frozen, world, holdout)
        rows.append((day, len(world.active), daily, stale))
        previous = root / f"day{day}"
    print(f"{'':>11}   {'effects RMSE':^21}   {'90% coverage':^21}   {'predictive RMSE':^21}")
    print(f"{'day':>3} {'users':>7}" + f"   {'daily':>10} {'frozen':>10}" * 3)
    for day, active, daily, stale in rows:
        print(
            f"{day:>3} {active:>7}   {daily['effects_rmse']:>10.3f} {stale['effects_rmse']:>10.3f}"
            f"   {daily['coverage']:>10.2f} {stale['coverage']:>10.2f}"
            f"   {daily['pred_rmse']:>10.3f} {stale['pred_rmse']:>10.3f}"
        )


if __name__ == "__main__":
    main()
