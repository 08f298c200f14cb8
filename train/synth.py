"""The embedded default dataset: synthetic, deterministic, shaped like large categorical data.

Rows carry Zipf-distributed categorical fields (a few heavy users / items, a long tail), numeric
features and a binary target drawn from a known logistic model, so a trained run can be checked
against the truth (``truth.json`` beside the data).

    python -m train.synth data/default/train.parquet --rows 1000000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import files

FIELDS = {"user": (50_000, 1.05, 0.5), "item": (5_000, 1.1, 0.3), "region": (100, 0.8, 0.2)}
BETA = [0.8, -0.5, 0.3, 0.0]
INTERCEPT = -1.0
DEFAULT_PATH = "data/default/train.parquet"  # configs/data/default.yaml's data.path


def _zipf_ids(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, size + 1) ** exponent
    return rng.choice(size, size=n, p=p / p.sum())


def generate(path: str | Path, rows: int = 1_000_000, seed: int = 0) -> dict:
    """Write the dataset to ``path`` (Parquet) atomically and ``truth.json`` beside it."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = rng.normal(size=(rows, len(BETA))).astype(np.float32)
    logit = INTERCEPT + x @ np.asarray(BETA, np.float32)
    columns: dict[str, np.ndarray] = {"row_id": np.arange(rows, dtype=np.int64)}
    truth: dict = {"intercept": INTERCEPT, "beta": BETA, "effect_sd": {}}
    for name, (size, exponent, sd) in FIELDS.items():
        idx = _zipf_ids(rng, rows, size, exponent)
        effects = rng.normal(0.0, sd, size)
        logit += effects[idx]
        truth["effect_sd"][name] = sd
        # raw values, not ids: non-contiguous ints for user/item, strings for region
        columns[name] = (
            np.char.add("r", idx.astype(str)) if name == "region" else idx * 7 + 1_000_003
        )
    for j in range(len(BETA)):
        columns[f"x{j + 1}"] = x[:, j]
    columns["y"] = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    table = pa.table(columns)
    files.atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=128 * 1024))
    truth["rows"] = rows
    truth["positive_rate"] = float(columns["y"].mean())
    files.write_text(path.parent / "truth.json", json.dumps(truth, indent=2))
    return truth


def _zinb(rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    counts = rng.negative_binomial(2.0, 2.0 / (2.0 + mean))
    return np.where(rng.random(mean.shape) < 0.3, 0, counts).astype(np.float64)


# the other links' targets given the mean e^eta: gamma shape 3; zinb concentration 2, gate 0.3
CROSSED_EXTRA = {
    "gamma": lambda rng, mean: rng.gamma(3.0, mean / 3.0),
    "exponential": lambda rng, mean: rng.exponential(mean),
    "zinb": _zinb,
}


def crossed_effects(
    path: str | Path,
    rows: int,
    levels: dict[str, int],
    sds: dict[str, float],
    link: str = "gaussian",
    intercept: float = 0.0,
    slope: float | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A target with crossed random effects (one id column per entry of ``levels``, effects
    drawn with ``sds``), an optional numeric ``x`` with coefficient ``slope``, under a
    gaussian (noise sd 1), logit or poisson link, or one of :data:`CROSSED_EXTRA`'s;
    written to ``path`` as Parquet. For checking the posterior against exact inference on
    data with a known truth."""
    rng = np.random.default_rng(seed)
    eta = np.full(rows, float(intercept))
    cols: dict[str, np.ndarray] = {}
    if slope is not None:
        x = rng.normal(size=rows)
        eta += slope * x
        cols["x"] = x.astype(np.float32)
    for name, size in levels.items():
        ids = rng.integers(0, size, rows)
        eta += rng.normal(0.0, sds[name], size)[ids]
        cols[name] = ids
    if link == "gaussian":
        y = eta + rng.normal(0.0, 1.0, rows)
    elif link == "logit":
        y = (rng.random(rows) < 1.0 / (1.0 + np.exp(-eta))).astype(np.float64)
    elif link == "poisson":
        y = rng.poisson(np.exp(eta)).astype(np.float64)
    elif link in CROSSED_EXTRA:
        y = CROSSED_EXTRA[link](rng, np.exp(eta))
    else:
        links = ["gaussian", "logit", "poisson", *CROSSED_EXTRA]
        raise ValueError(f"crossed_effects: link {link!r} is not one of {links}")
    cols["y"] = y.astype(np.float32)
    pq.write_table(pa.table(cols), path)
    return cols


def crossed_terms(categorical: list[str], numeric: list[str] | None = None) -> list[dict]:
    """``model.terms`` for :func:`crossed_effects` data: intercept, slope, one table each."""
    terms: list[dict] = [{"layer": "InterceptLayer", "name": "bias"}]
    if numeric:
        terms.append({"layer": "AdaptiveLayer", "name": "x", "inputs": list(numeric)})
    return terms + [{"layer": "RandomEffectsLayer", "name": c, "inputs": [c]} for c in categorical]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    truth = generate(args.path, args.rows, args.seed)
    print(f"wrote {args.rows:,} rows to {args.path} (positive rate {truth['positive_rate']:.3f})")


if __name__ == "__main__":
    main()
