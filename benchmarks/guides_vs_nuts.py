"""Each guide family against exact inference on the suite's crossed random effects.

The data, NUTS reference and service fits of ``tests/test_posterior_vs_nuts.py`` (20, 50 and
100 levels, 4,000 rows, gaussian, logit and poisson targets, 3,000 steps), printed as each
global site's posterior mean and sd, and their ratios to NUTS's, per guide.

    .venv/bin/python benchmarks/guides_vs_nuts.py [--links gaussian,logit,poisson]
        [--guides conditional,structured]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import test_posterior_vs_nuts as reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--links", default="gaussian,logit,poisson")
    parser.add_argument("--guides", default="conditional,structured")
    args = parser.parse_args()
    families = args.guides.split(",")
    print(f"{'link':<9}{'site':<34}{'NUTS':>16}" + "".join(f"{g:>34}" for g in families))
    with tempfile.TemporaryDirectory() as tmp:
        for link in args.links.split(","):
            root = Path(tmp) / link
            root.mkdir()
            cols = reference.simulate(link, root / "data.parquet")
            exact = reference.nuts(link, cols)
            fits = {g: reference.service(link, root / "data.parquet", root, g) for g in families}
            for site, (mean, sd) in exact.items():
                row = f"{link:<9}{site:<34}{mean:>9.3f} ±{sd:.3f}"
                for g in families:
                    m, s = fits[g][site]
                    row += f"{m:>10.3f} ±{s:.3f} ({m / mean:.2f}, sd {s / sd:.2f})"
                print(row, flush=True)


if __name__ == "__main__":
    main()
