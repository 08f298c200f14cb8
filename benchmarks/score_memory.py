"""Scoring throughput and peak memory vs number of rows, beside NumPyro's ``Predictive``.

    python benchmarks/score_memory.py                     # 1M and 10M rows, S=100 (~10 min)
    python benchmarks/score_memory.py --rows 200000 --draws 20
    python benchmarks/score_memory.py --rows 1000000 --users 1000000   # drawn batch by batch

A small run of the default model (intercept + dense + three random effects + an FM over
user x item) is trained once into ``benchmarks/.cache``. Each scorer runs in its own process
and reports its own peak RSS (``VmHWM``):

- ``blayers-score``: streamed, gathered table rows, summaries reduced on device (quantiles on
  the host on CPU, whose XLA sort is slow);
- ``Predictive``: NumPyro's ``Predictive`` over the same guide (same parameters, wrapped as a
  NumPyro guide), on all rows at once as it is normally used, returning the linear predictor;
  its address space is capped (``--peer-mem-gb``) so an out-of-memory shows as a failure
  instead of taking the machine down.

Upstream ``blayers`` has no separate predict path beyond ``Predictive``; it is not run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, for `train` and `blayers`


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), which — unlike ru_maxrss — starts afresh at
    exec, so a worker does not inherit its parent's high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


REPO = HERE.parent
CACHE = HERE / ".cache" / "score"


def with_users(path: Path, users: int, seed: int) -> None:
    """Replace ``path``'s user column by ``users`` uniform users (raw ids as synth's)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    ids = np.random.default_rng(seed).integers(0, users, table.num_rows) * 7 + 1_000_003
    table = table.set_column(table.schema.get_field_index("user"), "user", pa.array(ids))
    pq.write_table(table, path, row_group_size=128 * 1024)


def ensure_run(users: int = 0) -> Path:
    """The trained run: the default model on synth's data, or with ``users`` uniform users
    (a table too large for its draws to be made up front: scored batch by batch)."""
    run = CACHE / (f"run_users{users}" if users else "run")
    if (run / "checkpoints").exists():
        return run
    from omegaconf import OmegaConf

    from train import loop, synth
    from train.config import Config

    data = CACHE / (f"train_users{users}.parquet" if users else "train.parquet")
    synth.generate(data, max(200_000, 3 * users), seed=0)
    if users:
        with_users(data, users, seed=0)
    cfg = OmegaConf.structured(Config)
    cfg.run_dir, cfg.data.path = str(run), str(data)
    cfg.data.numeric, cfg.data.categorical = ["x1", "x2", "x3", "x4"], ["user", "item", "region"]
    cfg.model.link = "logit"
    cfg.model.terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "AdaptiveLayer", "name": "dense", "inputs": ["x1", "x2", "x3", "x4"]},
        {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
        {"layer": "RandomEffectsLayer", "name": "item", "inputs": ["item"]},
        {"layer": "RandomEffectsLayer", "name": "region", "inputs": ["region"]},
        {"layer": "FMLayer", "name": "fm", "inputs": ["user", "item"], "low_rank_dim": 4},
    ]
    cfg.train.steps, cfg.train.progress, cfg.mesh.data, cfg.mesh.model = 300, False, 1, 1
    loop.train(cfg, log=lambda _: None)
    return run


def ensure_rows(rows: int, users: int = 0) -> Path:
    from train import synth

    path = CACHE / (f"score_{rows}_users{users}.parquet" if users else f"score_{rows}.parquet")
    if not path.exists():
        synth.generate(path, rows, seed=1)
        if users:
            with_users(path, users, seed=1)
    return path


def worker_ours(run: str, data: str, draws: int) -> dict:
    from omegaconf import OmegaConf

    from train import score
    from train.config import ScoreConfig

    out = CACHE / f"out_{Path(data).stem}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = OmegaConf.structured(ScoreConfig)
    cfg.run_dir, cfg.output, cfg.data.path, cfg.draws = run, str(out), data, draws
    t = time.perf_counter()
    manifest = score.score(cfg, log=lambda _: None)
    return {"seconds": time.perf_counter() - t, "rows": manifest["rows"]}


def worker_predictive(run: str, data: str, draws: int, mem_gb: float) -> dict:
    limit = int(mem_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import jax
    import numpy as np
    import numpyro
    import numpyro.distributions as dist
    import pyarrow.parquet as pq
    from numpyro.distributions import biject_to
    from numpyro.infer import Predictive

    from train import vocab as vocab_lib
    from train.run import restore_run
    from train.state import guide_rows

    setup, state, _ = restore_run(Path(run))
    # {site: {loc, raw_scale}} whatever the layout (row-sparse tables keep one row state)
    params = {k: jax.tree.map(np.asarray, guide_rows(p)) for k, p in state.params.items()}

    def guide(batch, num_data=None):
        for name, site in setup.sites.items():
            loc, raw = params[name]["loc"], params[name]["raw_scale"]
            base = dist.Normal(loc, np.log1p(np.exp(raw))).to_event(np.ndim(loc))
            numpyro.sample(name, dist.TransformedDistribution(base, biject_to(site.support)))

    t = time.perf_counter()
    table = pq.read_table(data)
    vocabs = vocab_lib.load_all(Path(run) / "vocab", setup.columns.categorical)
    numeric = np.stack([table[c].to_numpy().astype(np.float32) for c in setup.columns.numeric], 1)
    cats = []
    for c in setup.columns.categorical:
        ids = vocabs[c].encode(table[c])
        cats.append(np.where(ids < 0, vocabs[c].size, ids).astype(np.int32))
    batch = {"numeric": numeric, "categorical": np.stack(cats, 1)}
    pred = Predictive(
        setup.model, guide=guide, num_samples=draws, return_sites=["linear_predictor"]
    )
    eta = pred(jax.random.PRNGKey(0), batch)["linear_predictor"][..., 0]
    p = 1 / (1 + np.exp(-np.asarray(eta)))
    summary = np.stack([p.mean(0), p.std(0), *np.quantile(p, [0.05, 0.5, 0.95], axis=0)], 1)
    assert summary.shape[0] == table.num_rows
    return {"seconds": time.perf_counter() - t, "rows": table.num_rows}


def run_worker(
    kind: str, run: Path, data: Path, draws: int, mem_gb: float, warm: bool = False
) -> dict:
    """One side's timing in a fresh process. ``warm``: with a persistent compilation cache of
    that side's own, filled by an untimed run first (as ``blayers-score`` runs by default, and
    as a NumPyro user can set JAX's cache); else every program is compiled in the timed run."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if warm:
        cache = CACHE / f"xla_cache_{kind}"
        shutil.rmtree(cache, ignore_errors=True)
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        run_worker_env(kind, run, data, draws, mem_gb, env)
    return run_worker_env(kind, run, data, draws, mem_gb, env)


def run_worker_env(
    kind: str, run: Path, data: Path, draws: int, mem_gb: float, env: dict[str, str]
) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(run), str(data), str(draws), str(mem_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = next(
            (ln for ln in reversed(lines) if "Error" in ln or "error" in ln),
            lines[-1] if lines else "failed",
        )
        return {"error": reason.strip()[:70]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1000000,10000000")
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--peer-mem-gb", type=float, default=16.0)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="time a second run of each side, its compiled programs read from a persistent "
        "compilation cache the first filled (default: both compile in the timed run)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=0,
        help="train and score with this many uniform users instead of synth's (e.g. 1000000: "
        "the tables' draws no longer fit predraw_mb, and scoring draws each batch's rows)",
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, run, data, draws, mem_gb = args.worker
        result = (
            worker_ours(run, data, int(draws))
            if kind == "ours"
            else worker_predictive(run, data, int(draws), float(mem_gb))
        )
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    CACHE.mkdir(parents=True, exist_ok=True)
    run = ensure_run(args.users)
    kinds = ["ours"] + ([] if args.skip_peer else ["predictive"])
    head = (
        f"{'rows':>11} {'draws':>5}"
        + "".join(f"{k + ' rows/s':>18}{k + ' RSS MB':>17}" for k in kinds)
        + ("  ours/predictive rows/s" if len(kinds) > 1 else "")
    )
    print(f"compilation: {'cache warm (second run)' if args.warm_cache else 'in the timed run'}")
    print(head)
    print("-" * len(head))
    for rows in (int(float(r)) for r in args.rows.split(",")):
        data = ensure_rows(rows, args.users)
        res = {
            k: run_worker(k, run, data, args.draws, args.peer_mem_gb, args.warm_cache)
            for k in kinds
        }
        cells = ""
        for k in kinds:
            r = res[k]
            if "error" in r:
                cells += f"{'failed':>18}{'-':>17}"
            else:
                cells += f"{r['rows'] / r['seconds']:>18,.0f}{r['peak_rss_mb']:>17,.0f}"
        ratio = ""
        if len(kinds) > 1 and all("error" not in res[k] for k in kinds):
            ratio = f"{(res['ours']['rows'] / res['ours']['seconds']) / (res['predictive']['rows'] / res['predictive']['seconds']):>24.2f}x"  # noqa: E501
        print(f"{rows:>11,} {args.draws:>5}{cells}{ratio}", flush=True)
        for k in kinds:
            if "error" in res[k]:
                print(f"    {k}: {res[k]['error']}")


if __name__ == "__main__":
    main()
