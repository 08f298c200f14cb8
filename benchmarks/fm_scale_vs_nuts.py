"""The factorization machine's scale against exact inference, with and without a true
interaction.

The default job's FM over user × item has no interaction in its data, and its scale fell for
as long as the run went on (0.107 at 4,000 steps, 0.003 at 60,000). This fits the default
job's model (intercept, user and item random effects, a rank-``--rank`` categorical FM over
user × item; logit link) on simulated data small enough for NUTS:

- ``--rows`` rows over ``--users`` × ``--items`` levels (uniform), effect sds 0.5 and 0.3,
  intercept −1, and an interaction ``⟨θ_u, θ_i⟩`` with factors drawn at ``--fm-scale`` (0: none);
- NUTS (numpyro), every table non-centred (``LocScaleReparam``);
- hand-written NumPyro SVI (``AutoNormal``, full batch), the FM centred and non-centred;
- the service (``train.api.fit``) with each of ``--variants`` (each a space-separated list
  of settings).

It prints each global's posterior mean and sd under each, and their ratios to NUTS's.

    .venv/bin/python benchmarks/fm_scale_vs_nuts.py [--fm-scale 0] [--rows 8000]
        [--steps 4000] [--samples 600] [--variants "optim.guide=conditional" ...]
        [--nuts-cache nuts.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import numpyro
import pyarrow as pa
import pyarrow.parquet as pq
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.reparam import LocScaleReparam

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blayers.layers import CategoricalFMLayer, InterceptLayer, RandomEffectsLayer
from blayers.links import logit_link
from train import api
from train.frames import as_arrow

SDS = {"user": 0.5, "item": 0.3}
INTERCEPT = -1.0


def simulate(args: argparse.Namespace, path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    sizes = {"user": args.users, "item": args.items}
    ids = {c: rng.integers(0, n, args.rows) for c, n in sizes.items()}
    eta = np.full(args.rows, INTERCEPT)
    for c, n in sizes.items():
        eta += rng.normal(0.0, SDS[c], n)[ids[c]]
    if args.fm_scale > 0:
        factors = {c: rng.normal(0.0, args.fm_scale, (n, args.rank)) for c, n in sizes.items()}
        eta += np.sum(factors["user"][ids["user"]] * factors["item"][ids["item"]], axis=1)
    y = (rng.random(args.rows) < 1.0 / (1.0 + np.exp(-eta))).astype(np.float32)
    pq.write_table(pa.table({**ids, "y": y}), path)
    return {**ids, "y": y}


def model_and_inputs(data: dict[str, np.ndarray], rank: int) -> tuple[Any, tuple]:
    """The job's model as hand-written NumPyro, on dense ids as the service's vocabulary gives
    them, plus its out-of-vocabulary row."""
    codes = {c: np.unique(data[c], return_inverse=True) for c in SDS}
    ids = {c: inverse.astype(np.int32) for c, (_, inverse) in codes.items()}
    sizes = {c: len(levels) + 1 for c, (levels, _) in codes.items()}
    pairs = np.stack([ids["user"], ids["item"]], axis=1)

    def model(ids, pairs, y):
        mu = InterceptLayer()("bias")
        for c in SDS:
            mu = mu + RandomEffectsLayer()(c, ids[c], sizes[c])
        mu = mu + CategoricalFMLayer()("fm", pairs, [sizes["user"], sizes["item"]], rank)
        return logit_link(mu, y)

    return model, (ids, pairs, data["y"])


def summarize(draws: dict[str, Any]) -> dict[str, tuple[float, float]]:
    out = {}
    for k, v in draws.items():
        if k.endswith("_scale") or k.endswith("_beta"):
            v = np.asarray(v).reshape(-1)
            out[k] = (float(v.mean()), float(v.std()))
    return out


def non_centred(model: Any, tables: bool = True) -> Any:
    sites = ["CategoricalFMLayer_fm_theta"]
    if tables:
        sites += [f"RandomEffectsLayer_{c}_theta" for c in SDS]
    return handlers.reparam(model, config={s: LocScaleReparam(0) for s in sites})


def nuts(data: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    model, inputs = model_and_inputs(data, args.rank)
    mcmc = MCMC(
        NUTS(non_centred(model)),
        num_warmup=args.samples // 2,
        num_samples=args.samples,
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(0), *inputs)
    return summarize(mcmc.get_samples())


def numpyro_svi(
    data: dict[str, np.ndarray], args: argparse.Namespace, fm_non_centred: bool
) -> dict[str, tuple[float, float]]:
    """Hand-written NumPyro: ``AutoNormal``, full-batch Adam(0.01), ``--steps`` steps."""
    model, inputs = model_and_inputs(data, args.rank)
    if fm_non_centred:
        model = non_centred(model, tables=False)
    guide = AutoNormal(model)
    svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), args.steps, *inputs, progress_bar=False)
    draws = Predictive(guide, params=result.params, num_samples=4000)(
        jax.random.PRNGKey(1), *inputs
    )
    return summarize(draws)


def service(path: Path, run_dir: Path, variant: str, args: argparse.Namespace) -> dict:
    terms = [
        "{layer: InterceptLayer, name: bias}",
        "{layer: RandomEffectsLayer, name: user, inputs: [user]}",
        "{layer: RandomEffectsLayer, name: item, inputs: [item]}",
        f"{{layer: CategoricalFMLayer, name: fm, inputs: [user, item], "
        f"low_rank_dim: {args.rank}, sparse: {str(args.fm_sparse).lower()}}}",
    ]
    run = api.fit(
        [
            f"run_dir={run_dir}",
            f"data.path={path}",
            "data.numeric=[]",
            "data.categorical=[user,item]",
            "model.link=logit",
            f"model.terms=[{','.join(terms)}]",
            f"data.batch_size={args.batch}",
            f"train.steps={args.steps}",
            f"checkpoint.every={args.steps}",
            "train.progress=false",
            *variant.split(),
        ]
    )
    rows = as_arrow(run.summary(draws=4000)).to_pylist()
    return {r["site"]: (r["mean"], r["std"]) for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--fm-scale", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--fm-sparse", type=int, default=1)
    parser.add_argument("--nuts-cache", type=Path, default=None, help="NUTS summaries, reused")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["optim.guide=conditional", "optim.guide=mean_field"],
        help="service settings per fit, space-separated key=value",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    forms = args.variants
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        data = simulate(args, path)
        key = (
            ":".join(str(v) for v in (args.rows, args.users, args.items, args.rank, args.fm_scale))
            + f":{args.seed}:{args.samples}"
        )
        cached = {}
        if args.nuts_cache is not None and args.nuts_cache.exists():
            cached = json.loads(args.nuts_cache.read_text())
        if key in cached:
            exact = {k: tuple(v) for k, v in cached[key].items()}
        else:
            start = time.perf_counter()
            exact = nuts(data, args)
            print(f"NUTS: {time.perf_counter() - start:.0f} s", flush=True)
            if args.nuts_cache is not None:
                args.nuts_cache.write_text(json.dumps({**cached, key: exact}))
        fits = {}
        for form, fm_nc in (
            ("numpyro AutoNormal", False),
            ("numpyro AutoNormal, FM non-centred", True),
        ):
            start = time.perf_counter()
            fits[form] = numpyro_svi(data, args, fm_nc)
            print(f"{form}: {time.perf_counter() - start:.0f} s", flush=True)
        for form in forms:
            start = time.perf_counter()
            fits[form] = service(path, Path(tmp) / str(len(fits)), form, args)
            print(f"{form}: {time.perf_counter() - start:.0f} s", flush=True)
    print(
        f"{args.rows:,} rows, {args.users} users x {args.items} items, rank {args.rank}, "
        f"true FM scale {args.fm_scale:g}, {args.steps:,} steps"
    )
    forms = list(fits)
    for i, f in enumerate(forms):
        print(f"({i}) {f if i < 2 else 'service: ' + f}")
    print(f"{'site':<32}{'NUTS':>17}" + "".join(f"{f'({i})':>36}" for i in range(len(forms))))
    for site, (mean, sd) in exact.items():
        row = f"{site:<32}{mean:>9.3f} ±{sd:.3f}"
        for f in forms:
            m, s = fits[f].get(site, (float("nan"), float("nan")))
            row += f"{m:>10.3f} ±{s:.3f} ({m / mean:.2f}, sd {s / sd:.2f})"
        print(row)


if __name__ == "__main__":
    main()
