"""Posterior quality of the service against exact inference (NUTS) on crossed random effects.

A gaussian target with mean 3 and three crossed grouping factors (14, 60 and 150 levels), the
case where a start blind to the data sends the small factor's scale far off. Each row of the
table is one way of training the same model through the service; NUTS (numpyro) on the same
data and the same priors is the reference. Prints posterior means and sds of the global sites.

    .venv/bin/python benchmarks/posterior_vs_nuts.py [--rows 6000] [--steps 3000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from numpyro.infer import MCMC, NUTS
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blayers.layers import InterceptLayer, RandomEffectsLayer
from blayers.links import gaussian_link
from train import loop, synth
from train.config import Config
from train.summary import summarize

SIZES, SDS = (14, 60, 150), (0.4, 0.8, 0.6)
GLOBALS = [
    "InterceptLayer_bias_beta",
    "RandomEffectsLayer_a_scale",
    "RandomEffectsLayer_b_scale",
    "RandomEffectsLayer_c_scale",
    "sigma",
]


def make_data(path: Path, rows: int, mean: float, seed: int) -> dict[str, np.ndarray]:
    levels = dict(zip("abc", SIZES, strict=True))
    return synth.crossed_effects(
        path, rows, levels, dict(zip("abc", SDS, strict=True)), intercept=mean, seed=seed
    )


def service(data: Path, run_dir: Path, steps: int, **overrides: object) -> dict[str, tuple]:
    cfg = OmegaConf.structured(Config)
    cfg.run_dir = str(run_dir)
    cfg.data.path = str(data)
    cfg.data.categorical = ["a", "b", "c"]
    cfg.data.batch_size = 256
    cfg.model.link = "gaussian"
    cfg.model.terms = synth.crossed_terms(list("abc"))
    cfg.train.steps = steps
    cfg.train.progress = False
    cfg.checkpoint.async_save = False
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    result = loop.train(cfg, log=lambda _: None)
    rows = summarize(run_dir, draws=4000)
    out = {r["site"]: (r["mean"], r["std"]) for r in rows}
    out["status"] = result["convergence"]
    return out


def nuts(cols: dict[str, np.ndarray], warmup: int, samples: int) -> dict[str, tuple]:
    """Same model and priors, ids re-encoded by frequency as the service's vocabulary does
    (the ids' order does not change the posterior of the globals)."""

    def model(a, b, c, y):
        mu = (
            InterceptLayer()("bias")
            + RandomEffectsLayer()("a", a, SIZES[0] + 1)
            + RandomEffectsLayer()("b", b, SIZES[1] + 1)
            + RandomEffectsLayer()("c", c, SIZES[2] + 1)
        )
        return gaussian_link(mu, y)

    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), cols["a"], cols["b"], cols["c"], cols["y"])
    draws = mcmc.get_samples()
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in draws.items() if k in GLOBALS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cols = make_data(root / "y.parquet", args.rows, 3.0, args.seed)
        data = root / "y.parquet"
        before = {"optim.start": "zero", "optim.recenter_every": 0}
        structured = {"optim.guide": "structured"}
        runs = {
            "NUTS": nuts(cols, args.warmup, args.samples),
            "mean-field, zero start, no recentering": service(
                data, root / "r0", args.steps, **before, **{"optim.guide": "mean_field"}
            ),
            "mean-field, data start, recentering": service(
                data, root / "r1", args.steps, **{"optim.guide": "mean_field"}
            ),
            "structured, zero start, no recentering": service(
                data, root / "r2", args.steps, **before, **structured
            ),
            "structured, zero start, recentering": service(
                data, root / "r3", args.steps, **{"optim.start": "zero"}, **structured
            ),
            "structured, data start, recentering": service(
                data, root / "r4", args.steps, **structured
            ),
            "conditional, zero start, no recentering": service(
                data, root / "r5", args.steps, **before
            ),
            "conditional, zero start, recentering": service(
                data, root / "r6", args.steps, **{"optim.start": "zero"}
            ),
            "conditional, data start, recentering (default)": service(
                data, root / "r7", args.steps
            ),
        }
    ref = runs["NUTS"]
    labels = ["intercept", "scale a (14)", "scale b (60)", "scale c (150)", "sigma"]
    print(f"{'run':<48}" + "".join(f"{label:>22}" for label in labels))
    for name, got in runs.items():
        cells = []
        for site in GLOBALS:
            m, sd = got[site]
            rel = "" if name == "NUTS" else f" ({m / ref[site][0]:.2f}x)"
            cells.append(f"{m:.3f}±{sd:.3f}{rel}".rjust(22))
        print(f"{name:<48}" + "".join(cells))
    for name, got in runs.items():
        if name != "NUTS":
            print(f"{name}: {got['status']}")


if __name__ == "__main__":
    main()
