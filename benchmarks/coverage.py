"""Interval coverage on simulated data with known truth, per guide family.

Each dataset draws its own truth (intercept, a slope, two random-effect scales) and then a
Poisson target with two crossed grouping factors; the service trains on it and reports 90%
intervals of the global sites (``blayers-summary``'s q05 / q95). Prints, per guide, how often
those intervals hold the truth, per site and overall.

    .venv/bin/python benchmarks/coverage.py [--datasets 20] [--rows 3000] [--steps 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import loop, synth
from train.config import Config
from train.summary import summarize

LEVELS = {"a": 30, "b": 10}
SITES = {
    "intercept": ("InterceptLayer_bias_beta", "0,0"),
    "slope": ("AdaptiveLayer_x_beta", "0,0"),
    "scale a (30)": ("RandomEffectsLayer_a_scale", ""),
    "scale b (10)": ("RandomEffectsLayer_b_scale", ""),
}


def simulate(path: Path, rows: int, rng: np.random.Generator) -> dict[str, float]:
    truth = {
        "intercept": rng.uniform(0.0, 1.5),
        "slope": rng.normal(0.0, 0.5),
        "scale a (30)": rng.uniform(0.2, 0.8),
        "scale b (10)": rng.uniform(0.2, 0.8),
    }
    sds = {name: truth[f"scale {name} ({size})"] for name, size in LEVELS.items()}
    synth.crossed_effects(
        path,
        rows,
        LEVELS,
        sds,
        "poisson",
        truth["intercept"],
        truth["slope"],
        seed=int(rng.integers(2**31)),
    )
    return truth


def fit(data: Path, run_dir: Path, guide: str, steps: int) -> dict[str, tuple[float, float]]:
    cfg = OmegaConf.structured(Config)
    cfg.run_dir = str(run_dir)
    cfg.data.path = str(data)
    cfg.data.numeric = ["x"]
    cfg.data.categorical = list(LEVELS)
    cfg.data.batch_size = 256
    cfg.model.link = "poisson"
    cfg.model.terms = synth.crossed_terms(list(LEVELS), ["x"])
    cfg.optim.guide = guide
    cfg.train.steps = steps
    cfg.train.progress = False
    cfg.checkpoint.every = steps
    cfg.checkpoint.async_save = False
    loop.train(cfg, log=lambda _: None)
    rows = {(r["site"], r["index"]): r for r in summarize(run_dir, draws=2000)}
    return {k: (rows[s]["q05"], rows[s]["q95"]) for k, s in SITES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", type=int, default=20)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--guides", default="mean_field,structured,conditional")
    args = parser.parse_args()
    guides = args.guides.split(",")
    hits = {g: {k: 0 for k in SITES} for g in guides}
    rng = np.random.default_rng(2026)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.datasets):
            data = Path(tmp) / f"d{i}.parquet"
            truth = simulate(data, args.rows, rng)
            for g in guides:
                intervals = fit(data, Path(tmp) / f"{g}-{i}", g, args.steps)
                for k, (lo, hi) in intervals.items():
                    hits[g][k] += int(lo <= truth[k] <= hi)
            print(f"dataset {i + 1}/{args.datasets} done", file=sys.stderr, flush=True)
    n = args.datasets
    print(f"{'guide':<12}" + "".join(f"{k:>15}" for k in SITES) + f"{'all':>10}")
    for g in guides:
        total = sum(hits[g].values())
        cells = "".join(f"{hits[g][k]:>9}/{n:<5}" for k in SITES)
        print(f"{g:<12}{cells}{total / (n * len(SITES)):>10.0%}")


if __name__ == "__main__":
    main()
