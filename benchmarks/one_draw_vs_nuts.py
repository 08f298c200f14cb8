"""Where one draw per step is enough: a logit random-effects scale under one draw and under
the antithetic pair (``optim.antithetic``), against NUTS, as rows per level and the base rate
vary.

Each case simulates ``levels`` levels with exactly ``rows`` binary rows each (scale 0.5, one
slope 0.8, intercept ``b0``), fits it with the service at full batch (4,000 steps, so only
the draws are noisy) with one draw and with the pair, and runs NUTS (300 + 600 draws, the
table non-centred), all through ``tests/test_weak_levels.py``'s helpers, its data too. It
prints the scale's posterior mean / sd under each, and each level's information about its
effect, ``rows · p̄(1 − p̄)``.

    .venv/bin/python benchmarks/one_draw_vs_nuts.py [--cases 2:4500:-1 3:3000:-1 ...] [--seed 1]

A case is ``rows:levels:b0``. The defaults are the cases in
``results/train_throughput_small_tables.md``; each takes 1–5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import test_weak_levels as weak

CASES = ("2:4500:-1", "3:3000:-1", "5:1800:-1", "20:450:-1", "2:1500:-1", "40:1500:-5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="rows:levels:b0")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    head = f"{'rows':>5} {'levels':>7} {'b0':>5} {'rate':>6} {'info':>6}"
    print(f"{head} {'one draw':>15} {'pair':>15} {'NUTS':>15}   (scale mean / sd)")
    for case in args.cases:
        rows, levels, b0 = case.split(":")
        tmp = Path(tempfile.mkdtemp(prefix="one-draw-"))
        cols = weak.simulate(tmp / "data.parquet", int(levels), args.seed, int(rows), float(b0))
        rate = float(cols["y"].mean())
        fits = [
            weak.service(tmp / "data.parquet", tmp / f"run_{anti}", len(cols["y"]), anti)
            for anti in (False, True)
        ]
        cells = [f"{m:.3f} / {s:.3f}" for m, s in (*fits, weak.nuts(cols))]
        info = int(rows) * rate * (1 - rate)
        print(
            f"{rows:>5} {levels:>7} {b0:>5} {rate:>6.3f} {info:>6.2f} "
            + " ".join(f"{c:>15}" for c in cells),
            flush=True,
        )


if __name__ == "__main__":
    main()
