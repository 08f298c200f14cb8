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
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import test_coupling_rate as reference

DEFAULT_FITS = ",".join(
    [
        "mean_field:0.01:1:5000",
        *(f"conditional:0.01:{f}:5000" for f in (1, 0.1, 0.03, 0.01)),
        *(f"conditional:0.03:{f}:3000" for f in (1, 0.1, 0.03)),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fits", default=DEFAULT_FITS)
    args = parser.parse_args()
    print(f"{'guide':<12}{'lr':>6}{'factor':>8}{'steps':>7}{'sigma':>8}   sd / exact sd")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        exact = reference.simulate(path)
        for spec in args.fits.split(","):
            guide, lr, factor, steps = spec.split(":")
            run = Path(tmp) / spec.replace(":", "_")
            got = reference.fit(path, run, float(factor), int(steps), float(lr), guide)
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
