"""A small job end to end against myFM's Gibbs sampler on the same data.

``--rows`` rows of the default data (``train/synth.py``: binary target, four numeric
features, user, item and region, a user x item interaction) for training and a quarter as
many held out (another seed). Each side trains on the training rows and predicts the
held-out rows, and is timed from the command a user would run to the predictions on disk or
in memory:

- blayers: ``blayers-train`` (the default model, ``--steps`` steps) then ``blayers-score``
  on the held-out rows, each its own process as a user runs them, with the compilation
  cache warm (one untimed pass first);
- myFM (``pip install myfm``): ``MyFMClassifier`` (Bayesian FM, probit, Gibbs), rank
  ``--rank``, ``--iters`` iterations, on one-hot user, item and region plus the numeric
  features, then ``predict_proba``.

Printed: wall seconds, held-out log-loss and AUC.

    .venv/bin/python benchmarks/small_job_vs_myfm.py [--rows 100000] [--steps 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train import synth  # noqa: E402

CATEGORICAL, NUMERIC = ("user", "item", "region"), ("x1", "x2", "x3", "x4")


def blayers_seconds(tmp: Path, train: Path, held: Path, steps: int, name: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "BLAYERS_COMPILATION_CACHE": str(tmp / "cache")}
    run_dir = tmp / name
    start = time.perf_counter()
    for tool, args in (
        ("train", [f"data.path={train}", f"train.steps={steps}", "train.progress=false"]),
        ("score", [f"data.path={held}", f"output={run_dir}/scores"]),
    ):
        code = f"from train.cli import {tool}_main; {tool}_main()"
        proc = subprocess.run(
            [sys.executable, "-c", code, f"run_dir={run_dir}", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
        )
        if proc.returncode != 0:
            sys.exit(f"blayers-{tool} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def one_hot(train: Any, held: Any) -> tuple[Any, Any]:
    import scipy.sparse as sp

    blocks_train, blocks_held = [], []
    for column in CATEGORICAL:
        values = np.unique(train[column].to_numpy())
        index = {v: i for i, v in enumerate(values)}
        for table, blocks in ((train, blocks_train), (held, blocks_held)):
            ids = np.array([index.get(v, -1) for v in table[column].to_numpy()])
            rows = np.flatnonzero(ids >= 0)
            blocks.append(
                sp.csr_matrix(
                    (np.ones(len(rows)), (rows, ids[rows])), shape=(table.num_rows, len(values))
                )
            )
    for table, blocks in ((train, blocks_train), (held, blocks_held)):
        blocks.append(sp.csr_matrix(np.stack([table[c].to_numpy() for c in NUMERIC], 1)))
    return sp.hstack(blocks_train).tocsr(), sp.hstack(blocks_held).tocsr()


def metrics(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    log_loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    order = np.argsort(p)
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    positives = y.sum()
    auc = (ranks[y == 1].sum() - positives * (positives + 1) / 2) / (
        positives * (len(y) - positives)
    )
    return log_loss, float(auc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # myFM's per-iteration progress bar
    import myfm

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        train, held = tmp / "train" / "train.parquet", tmp / "held" / "held.parquet"
        synth.generate(train, args.rows, seed=0)
        synth.generate(held, args.rows // 4, seed=1)
        blayers_seconds(tmp, train, held, args.steps, "warmup")
        ours = blayers_seconds(tmp, train, held, args.steps, "timed")
        scores = pq.read_table(tmp / "timed" / "scores")
        train_t, held_t = pq.read_table(train), pq.read_table(held)
        y_held = held_t["y"].to_numpy().astype(np.float64)
        ours_fit = metrics(y_held, scores["mean"].to_numpy())

        start = time.perf_counter()
        x_train, x_held = one_hot(train_t, held_t)
        model = myfm.MyFMClassifier(rank=args.rank, random_seed=0)
        model.fit(
            x_train, train_t["y"].to_numpy(), n_iter=args.iters, n_kept_samples=args.iters // 2
        )
        p_myfm = model.predict_proba(x_held)
        theirs = time.perf_counter() - start
        theirs_fit = metrics(y_held, p_myfm)

    print(f"{args.rows:,} training rows, {args.rows // 4:,} held out")
    print(f"{'':<36}{'wall s':>8}{'log-loss':>10}{'AUC':>8}")
    label = f"blayers train {args.steps} steps + score"
    print(f"{label:<36}{ours:>8.1f}{ours_fit[0]:>10.4f}{ours_fit[1]:>8.4f}")
    label = f"myFM Gibbs rank {args.rank}, {args.iters} iters"
    print(f"{label:<36}{theirs:>8.1f}{theirs_fit[0]:>10.4f}{theirs_fit[1]:>8.4f}")
    print(f"blayers / myFM wall time: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
