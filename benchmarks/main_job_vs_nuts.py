"""The default job's model against exact inference, on a random subsample of its data.

At batch 4,096 the full default job converged to user and item scales 5% below NUTS's on all
1M rows, at batch 65,536 1.5% (``benchmarks/results/main_job_convergence.md``). This takes
``--rows`` random rows of ``data/default/train.parquet``
(run ``make train`` once to generate it), keeps the job's model without the FM term
(intercept, the four dense coefficients under their adaptive scale, random effects for user,
item and region; logit link), and fits it twice on the same rows:

- NUTS (numpyro), with one extra row per table as the service has (its out-of-vocabulary
  row, which no data touches). Each row is partially centred by its count
  (``LocScaleReparam(c_r)``, :math:`c_r = n_r w / (n_r w + 1/s^2)` with :math:`w = 0.2`, a
  logit observation's information near this data's positive rate, and :math:`s = 0.3`): a
  reparameterization, so the posterior is the same, but heavy rows are centred and weak ones
  not, which took NUTS on all 1M rows from 1,023 leapfrog steps per draw (fully non-centred)
  to 63;
- the service (``train.api.fit``) with each guide in ``--guides``.

It prints each global's posterior mean and sd under each, and their ratios to NUTS's. The
subsample keeps the long tail's character: most users in it have one or two rows.

    .venv/bin/python benchmarks/main_job_vs_nuts.py [--rows 40000] [--steps 4000]
        [--guides conditional,structured] [--samples 500] [--warmup 250] [--batch 2048]
        [--nuts-cache nuts.json] [--tables user,item,region]

``--rows 1000000`` is the whole job (NUTS 250 + 250 draws: ~25 minutes on 2 cores).

``--tables``: keep random effects for these columns only (the crossing's share of a gap).

``--nuts-cache``: NUTS's summaries are read from that file when it exists (for the same rows
and samples), else written there, so several guides or step counts compare against one NUTS
run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpyro import handlers
from numpyro.infer import MCMC, NUTS
from numpyro.infer.reparam import LocScaleReparam

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blayers.layers import AdaptiveLayer, InterceptLayer, RandomEffectsLayer
from blayers.links import logit_link
from train import api
from train.frames import as_arrow

DATA = Path("data/default/train.parquet")
NUMERIC = ["x1", "x2", "x3", "x4"]
CATEGORICAL = ["user", "item", "region"]


def subsample(rows: int, path: Path) -> pa.Table:
    table = pq.read_table(DATA, columns=[*NUMERIC, *CATEGORICAL, "y"])
    keep = np.sort(np.random.default_rng(0).choice(table.num_rows, rows, replace=False))
    table = table.take(pa.array(keep))
    pq.write_table(table, path)
    return table


def centering(ids: np.ndarray, size: int, info: float = 0.2, sd: float = 0.3) -> np.ndarray:
    """Each row's centredness for ``LocScaleReparam``: the share of its posterior precision
    that its data gives, at a typical scale ``sd`` and ``info`` per observation."""
    n = np.bincount(ids, minlength=size).astype(np.float32)
    return n * info / (n * info + 1.0 / sd**2)


def nuts(
    table: pa.Table, samples: int, tables: list[str] = CATEGORICAL, warmup: int | None = None
) -> dict[str, tuple[float, float]]:
    x = np.stack([table[c].to_numpy() for c in NUMERIC], axis=1).astype(np.float32)
    ids, sizes = {}, {}
    for c in tables:
        codes = pc.dictionary_encode(table[c]).combine_chunks()
        ids[c] = codes.indices.to_numpy().astype(np.int32)
        sizes[c] = len(codes.dictionary) + 1  # + the service's out-of-vocabulary row
    y = table["y"].to_numpy().astype(np.float32)

    def model(x, ids, y):
        mu = InterceptLayer()("bias") + AdaptiveLayer()("dense", x)
        for c in tables:
            mu = mu + RandomEffectsLayer()(c, ids[c], sizes[c])
        return logit_link(mu, y)

    thetas = {
        f"RandomEffectsLayer_{c}_theta": LocScaleReparam(centering(ids[c], sizes[c]))
        for c in tables
    }
    mcmc = MCMC(
        NUTS(handlers.reparam(model, config=thetas)),
        num_warmup=samples // 2 if warmup is None else warmup,
        num_samples=samples,
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(0), x, ids, y)
    draws = mcmc.get_samples()
    out = {}
    for k, v in draws.items():
        if k.endswith("_scale") or k.endswith("_beta"):
            v = np.asarray(v).reshape(len(v), -1)
            for j in range(v.shape[1]):
                name = k if v.shape[1] == 1 else f"{k}[{j}]"
                out[name] = (float(v[:, j].mean()), float(v[:, j].std()))
    return out


def table_terms(tables: list[str]) -> list[str]:
    """The service's settings for the job's model with random effects for ``tables`` only."""
    terms = [
        "{layer:InterceptLayer,name:bias}",
        "{layer:AdaptiveLayer,name:dense,inputs:[x1,x2,x3,x4]}",
        *(f"{{layer:RandomEffectsLayer,name:{c},inputs:[{c}]}}" for c in tables),
    ]
    return [f"data.categorical=[{','.join(tables)}]", f"model.terms=[{','.join(terms)}]"]


def service(
    path: Path,
    run_dir: Path,
    guide: str,
    steps: int,
    extra: list[str],
    tables: list[str],
    batch: int = 2048,
) -> dict[str, tuple[float, float]]:
    run = api.fit(
        [
            f"run_dir={run_dir}",
            f"data.path={path}",
            "model=random_effects",
            *table_terms(tables),
            f"data.batch_size={batch}",
            f"train.steps={steps}",
            f"checkpoint.every={steps}",
            "train.progress=false",
            f"optim.guide={guide}",
            *extra,
        ]
    )
    rows = as_arrow(run.summary(draws=4000)).to_pylist()
    out = {}
    for r in rows:
        index = str(r.get("index") or "")
        many = r["site"] == "AdaptiveLayer_dense_beta"
        name = f"{r['site']}[{index.split(',')[0]}]" if many else r["site"]
        out[name] = (r["mean"], r["std"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=None, help="default: samples / 2")
    parser.add_argument("--batch", type=int, default=2048, help="the service's minibatch")
    parser.add_argument("--guides", default="conditional,structured")
    parser.add_argument("--nuts-cache", type=Path, default=None)
    parser.add_argument(
        "--tables", default=",".join(CATEGORICAL), help="the random-effect tables to keep"
    )
    parser.add_argument("override", nargs="*", help="more service settings, key=value")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} is missing: run `make train` once to generate the default data")
    families = args.guides.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.parquet"
        table = subsample(args.rows, path)
        users = len(pc.unique(table["user"]))
        print(f"{args.rows:,} rows: {users:,} users, {len(pc.unique(table['item'])):,} items")
        tables = args.tables.split(",")
        key = f"{args.rows}:{args.samples}:{args.warmup}" + (
            "" if tables == CATEGORICAL else f":{args.tables}"
        )
        cached = {}
        if args.nuts_cache is not None and args.nuts_cache.exists():
            cached = json.loads(args.nuts_cache.read_text())
        if key in cached:
            exact = {k: tuple(v) for k, v in cached[key].items()}
        else:
            start = time.perf_counter()
            exact = nuts(table, args.samples, tables, args.warmup)
            print(f"NUTS: {time.perf_counter() - start:.0f} s", flush=True)
            if args.nuts_cache is not None:
                args.nuts_cache.write_text(json.dumps({**cached, key: exact}))
        fits = {}
        for g in families:
            start = time.perf_counter()
            fits[g] = service(path, Path(tmp) / g, g, args.steps, args.override, tables, args.batch)
            print(f"{g}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{'site':<36}{'NUTS':>18}" + "".join(f"{g:>36}" for g in families))
    for site, (mean, sd) in exact.items():
        if not all(site in f for f in fits.values()):
            continue
        row = f"{site:<36}{mean:>10.3f} ±{sd:.3f}"
        for g in families:
            m, s = fits[g][site]
            row += f"{m:>10.3f} ±{s:.3f} ({m / mean:.2f}, sd {s / sd:.2f})"
        print(row)


if __name__ == "__main__":
    main()
