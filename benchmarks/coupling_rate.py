"""The structured guide's coupling rate (``optim.coupling_lr_factor``) against the exact
posterior, on a regression whose 15 inputs all load on the first (so the coefficients'
posterior is strongly correlated): 2,000 rows, gaussian, noise sd 0.3.

Each fit goes through the service (``train.loop.train``, then ``train.summary``); the exact
posterior sds of the intercept and coefficients are those of least squares given sigma.
Printed per fit: sigma's posterior mean, and the ratio of each coefficient's posterior sd to
the exact one (median, min, max).

    .venv/bin/python benchmarks/coupling_rate.py [--fits conditional:0.01:0.03:5000,...]

A fit is ``guide:lr:factor:steps``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.service_helpers import quiet_config
from train import loop
from train.summary import summarize

N, D, SIGMA = 2000, 15, 0.3
DEFAULT_FITS = ",".join(
    [
        "mean_field:0.01:1:5000",
        *(f"conditional:0.01:{f}:5000" for f in (1, 0.1, 0.03, 0.01)),
        *(f"conditional:0.03:{f}:3000" for f in (1, 0.1, 0.03)),
    ]
)


def simulate(path: Path) -> np.ndarray:
    """Writes the data; returns the exact posterior sds (intercept first)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D))
    x[:, 1:] += 0.9 * x[:, :1]
    beta = rng.normal(size=D) * 0.5
    y = 0.5 + x @ beta + rng.normal(0, SIGMA, N)
    columns = {f"x{j}": x[:, j].astype(np.float32) for j in range(D)}
    pq.write_table(pa.table({**columns, "y": y.astype(np.float32)}), path)
    design = np.column_stack([np.ones(N), x])
    return np.sqrt(np.diag(np.linalg.inv(design.T @ design))) * SIGMA


def fit(path: Path, run: Path, guide: str, lr: float, factor: float, steps: int) -> dict:
    inputs = [f"x{j}" for j in range(D)]
    settings = {
        "data.numeric": inputs,
        "data.categorical": [],
        "data.batch_size": 250,
        "model.link": "gaussian",
        "model.terms": [
            {"layer": "InterceptLayer", "name": "bias"},
            {"layer": "AdaptiveLayer", "name": "w", "inputs": inputs},
        ],
        "train.steps": steps,
        "checkpoint.every": steps,
        "optim.lr": lr,
        "optim.guide": guide,
        "optim.coupling_lr_factor": factor,
        "mesh.data": 1,
    }
    shutil.rmtree(run, ignore_errors=True)
    loop.train(quiet_config(path, run, settings), log=lambda _: None)
    out: dict[str, list] = {}
    for r in summarize(run, draws=2000):
        out.setdefault(r["site"], []).append((r["mean"], r["std"]))
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fits", default=DEFAULT_FITS)
    args = parser.parse_args()
    print(f"{'guide':<12}{'lr':>6}{'factor':>8}{'steps':>7}{'sigma':>8}   sd / exact sd")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        exact = simulate(path)
        for spec in args.fits.split(","):
            guide, lr, factor, steps = spec.split(":")
            got = fit(path, Path(tmp) / "run", guide, float(lr), float(factor), int(steps))
            sds = np.concatenate(
                [got[f"{s}_beta"][:, 1] for s in ("InterceptLayer_bias", "AdaptiveLayer_w")]
            )
            ratio = sds / exact
            print(
                f"{guide:<12}{lr:>6}{factor:>8}{steps:>7}{got['sigma'][0, 0]:>8.3f}   "
                f"median {np.median(ratio):.2f} [{ratio.min():.2f}, {ratio.max():.2f}]",
                flush=True,
            )


if __name__ == "__main__":
    main()
