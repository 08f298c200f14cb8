"""Training throughput and peak memory vs table size, side by side with the peers.

    python benchmarks/train_throughput.py                       # full table (~1 hour, 2 cores)
    python benchmarks/train_throughput.py --cats 1000,1000000 --terms random_effects

Model: intercept + AdaptiveLayer over 32 dense features + one categorical term with ``c``
categories (RandomEffectsLayer, EmbeddingLayer dim 8, or an FM over (g, h) with rank 8) +
gaussian link, batch 4096, Zipf-distributed ids. Paths:

- ``sparse``   this project, row-sparse step (``sparse: true``)
- ``dense``    this project, dense step (``sparse: false``)
- ``dense-mf`` the dense step with what hand-written NumPyro computes: ``optim.guide=mean_field``
  and ``optim.antithetic=false`` (one draw of independent Normals per step, as ``AutoNormal``
  with ``Trace_ELBO``), to tell the step's own cost from the default guide's extra work
- ``numpyro``  hand-written NumPyro: ``plate(subsample_size)``, ``AutoNormal``, optax Adam, jit
- ``numpyro-scan`` the same, ``svi.update`` scanned over 10 stacked batches per dispatch, as
  the service does by default: what a NumPyro user would write to cut dispatches
- ``upstream`` upstream ``blayers`` from PyPI, ``Batched_Trace_ELBO`` (own venv, since it is
  also called ``blayers``; ``--skip-upstream`` leaves it out)

Modes: ``step`` (batches already on device, as the peers run; ours as shipped, 10 steps per
dispatch), ``step1`` (the same, one step per dispatch) and ``e2e`` (this project only: Parquet →
grain data stage → step, as shipped). Each configuration runs in its own process so its peak RSS
(``VmHWM``) is its own; compile time is excluded; throughput is the median of repeats (each
at least ~0.5 s), and each cell the median over ``--rounds`` fresh processes, the paths of a
row taking turns.

After each term's rows, the sparse step's flatness in table size is measured again with all
sizes in one process, taking turns in ~0.3 s blocks (``--flat-blocks`` per size): cells of the
main table are minutes apart, and a shared machine's speed can drift more than that between them.
``--peer-blocks N`` does the same for ours as shipped against NumPyro (one step per dispatch,
scanned, and scanned at two draws per step, the model evaluations of the default guide's
antithetic pair) at each size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), which — unlike ru_maxrss — starts afresh at
    exec, so a worker does not inherit its parent's high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mb() -> float:
    """Peak memory of the device the step ran on: host RSS on CPU, the allocator's peak bytes
    in use on an accelerator (its host RSS says nothing about the tables there)."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return peak_rss_mb()


REPO = HERE.parent
CACHE = HERE / ".cache"
UPSTREAM_VENV = CACHE / "venv-upstream"
BATCH, DENSE_D, EMBED_DIM, N_DATA = 4096, 32, 8, 10_000_000
PLATFORM = "cpu"  # JAX_PLATFORMS of the workers (--platform)
UPSTREAM_SITE = ""  # a pip --target folder holding upstream blayers (--upstream-site)


# ------------------------------------------------------------------ workers (one per process)


def _zipf_ids(rng, n, c):
    import numpy as np

    ranks = rng.zipf(1.2, size=n)
    return ((ranks - 1) % c).astype(np.int32)


def _batches(c, count=8, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        out.append(
            {
                "x": rng.normal(size=(BATCH, DENSE_D)).astype(np.float32),
                "g": _zipf_ids(rng, BATCH, c),
                "h": rng.integers(0, 1000, BATCH).astype(np.int32),
                "y": rng.normal(size=BATCH).astype(np.float32),
            }
        )
    return out


def _time_steps(run_step, steps, repeats, warmup=8):
    # compile, then one pass over the distinct batches: their unique-row arrays may take
    # different static lengths, one compilation each (as early in a long run). A path that
    # takes seconds per step (dense tables at 10^7) stops warming after two such steps.
    run_step(0)
    times: list[float] = []
    for i in range(1, warmup + 1):
        t = time.perf_counter()
        run_step(i)
        times.append(time.perf_counter() - t)
        if len(times) >= 2 and min(times[-2:]) > 2.0:
            break
    one = times[-1]
    if one > 2.0:  # a slow path: keep the benchmark bounded
        steps, repeats = 2, 1
    else:  # fast paths: each repeat runs at least ~0.5 s, so timer noise stays small
        steps = max(steps, min(4000, int(0.5 / max(one, 1e-6))))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(steps):
            run_step(i)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def _ours_setup(c, term, sparse, mean_field_one_draw=False):
    import numpy as np
    from omegaconf import OmegaConf

    from train.config import Config
    from train.plan import ShardingPlan
    from train.setup import make_setup
    from train.step import make_train_step

    cfg = OmegaConf.structured(Config)
    cfg.data.numeric = [f"x{j}" for j in range(DENSE_D)]
    cfg.data.categorical = ["g", "h"]
    cfg.data.batch_size = BATCH
    cfg.model.link = "gaussian"
    table = {
        "random_effects": {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"]},
        "embedding": {
            "layer": "EmbeddingLayer",
            "name": "g",
            "inputs": ["g"],
            "embedding_dim": EMBED_DIM,
        },
        "fm": {"layer": "FMLayer", "name": "fm", "inputs": ["g", "h"], "low_rank_dim": EMBED_DIM},
    }[term]
    cfg.model.terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "AdaptiveLayer", "name": "dense", "inputs": cfg.data.numeric},
        {**table, "sparse": sparse},
    ]
    cfg.mesh.data, cfg.mesh.model = 1, 1
    if mean_field_one_draw:
        cfg.optim.guide, cfg.optim.antithetic = "mean_field", False
    sizes = {"g": c - 1, "h": 999}  # + one OOV row each
    setup = make_setup(cfg, sizes, N_DATA, ShardingPlan.from_config(cfg))
    # vocabulary counts (int64, as the service keeps them), built without float64 temporaries:
    # at c = 10^7 those would add ~240 MB to this process's peak that no training run has
    ranks = np.arange(1, c, dtype=np.float32)
    np.power(ranks, 1.2, out=ranks)
    np.divide(np.float32(N_DATA), ranks, out=ranks)
    g_counts = ranks.astype(np.int64)
    del ranks
    g_counts += 1
    counts = {"g": g_counts, "h": np.full(999, N_DATA // 999)}
    return cfg, setup, make_train_step(setup, counts)


def worker_ours(c, term, sparse, mode, steps, repeats, mean_field_one_draw=False):
    import jax

    cfg, setup, step = _ours_setup(c, term, sparse, mean_field_one_draw)
    state = jax.jit(setup.init, out_shardings=setup.shardings)()
    # as shipped: the service's steps per dispatch, a call of the runner taking k steps
    k = 1 if mode == "step1" else cfg.train.steps_per_dispatch
    if mode == "e2e":
        runner = _e2e_runner(cfg, setup, step, state, c, per_dispatch=k)
    else:
        runner = _in_memory_runner(c, step, state, per_dispatch=k)
    return _time_steps(runner, max(1, steps // k), repeats) / k


def dedicated_cores_line() -> str:
    """What ``data.dedicated_cores=true`` does on this machine (train.cores), in words."""
    from train.config import DataConfig
    from train.cores import split_cores

    if PLATFORM != "cpu" or not hasattr(os, "sched_getaffinity"):
        return "no split (not the CPU backend)"
    split = split_cores(os.sched_getaffinity(0), DataConfig().prefetch)
    if split is None:
        return "no split (one core)"
    return f"pipeline threads on cores {sorted(split.data)}, XLA's pool on {sorted(split.compute)}"


def prepared_batches(c, step):
    """The 8 benchmark batches as the step takes them, host-side dedup included (numpy)."""
    import numpy as np

    return [
        step.prepare(
            {"numeric": b["x"], "categorical": np.stack([b["g"], b["h"]], 1), "target": b["y"]}
        )
        for b in _batches(c)
    ]


def dispatch_groups(batches, k):
    """As many groups of ``k`` consecutive batches as there are batches, cycling through them:
    the stacked batches of ``k`` steps per dispatch."""
    n = len(batches)
    return [[batches[(g * k + j) % n] for j in range(k)] for g in range(n)]


def _in_memory_runner(c, step, state, block=True, per_dispatch=1):
    """``run(i) -> loss``: one dispatch on the i-th of 8 batches held on device, as the peers
    get them; the host-side dedup is part of preparing them. ``per_dispatch`` > 1: the
    service's scanned step (``train.dispatch``) over that many batches, stacked on device, so
    a call takes that many steps. ``block``: wait for each dispatch (as the main table does);
    else dispatches queue up as they do in a training loop."""
    import jax

    from train import dispatch

    local = prepared_batches(c, step)
    if per_dispatch > 1:
        shardings = {k: dispatch.stacked_sharding(v) for k, v in step.batch_shardings.items()}
        batches = [
            dispatch.Stacked(jax.device_put(dict(step.stack(group)), shardings))
            for group in dispatch_groups(local, per_dispatch)
        ]
    else:
        batches = [
            {k: jax.device_put(v, step.batch_shardings[k]) for k, v in b.items()} for b in local
        ]
    holder = {"state": state}

    def run(i):
        holder["state"], loss = step(holder["state"], batches[i % len(batches)])
        if block:
            loss.block_until_ready()
        return loss

    return run


def worker_flatness(cats, term, blocks, block_s=0.3):
    """Seconds per sparse step at each table size, measured in ONE process with the sizes
    taking turns in short blocks, so a slow spell of a shared machine falls on all of them
    alike. The separate-process cells of the main table are minutes apart, and on a machine
    whose speed drifts that much their ratio says more about the drift than about the step.
    Returns, per size, the median over blocks of that block's seconds per step."""
    import jax

    runners = {}
    for c in cats:
        _, setup, step = _ours_setup(c, term, True)
        state = jax.jit(setup.init, out_shardings=setup.shardings)()
        runners[str(c)] = _in_memory_runner(c, step, state)
    return _interleaved(runners, blocks, block_s)


def worker_e2e_ratio(c, term, blocks, dedicated_cores, block_s=0.3):
    """Seconds per sparse step, step-only and end to end, taking turns in short blocks in one
    process (as in ``worker_flatness``): the e2e / step-only ratio without the drift between
    separate cells. Each step is timed to completion, as in the main table. With
    ``dedicated_cores`` the process splits its cores as ``data.dedicated_cores=true`` does
    (before the backend exists), so both loops run on XLA's smaller pool."""
    cores = None
    if dedicated_cores:
        from train.config import DataConfig
        from train.cores import reserve

        cores = reserve(DataConfig().prefetch)[0]
    import jax

    cfg, setup, step = _ours_setup(c, term, True)
    k = cfg.train.steps_per_dispatch  # the service's default (train.dispatch)
    runners = {}
    for key in ("step", "step-k", "e2e", "e2e-1"):
        state = jax.jit(setup.init, out_shardings=setup.shardings)()
        per_dispatch = k if key in ("step-k", "e2e") else 1
        runners[key] = (
            _in_memory_runner(c, step, state, per_dispatch=per_dispatch)
            if key.startswith("step")
            else _e2e_runner(cfg, setup, step, state, c, cores, per_dispatch=per_dispatch)
        )
    sec = _interleaved(runners, blocks, block_s)
    for key in ("step-k", "e2e"):
        sec[key] /= k  # a call of that runner takes k steps
    return {**sec, "split": cores is not None, "per_dispatch": k}


def worker_peers(c, term, blocks, block_s=0.3):
    """Seconds per step of ours as shipped (``sparse: auto``, the service's steps per
    dispatch), hand-written NumPyro one step per dispatch, and NumPyro scanned over as many
    batches per dispatch, taking turns in blocks in one process (as ``worker_flatness``):
    how ours compares with the faster peer without the drift between separate cells. Also
    NumPyro scanned at two draws per step (``numpyro-scan-2``): as many model evaluations
    as the default guide's antithetic pair, to tell the pair's cost from the step's."""
    import jax

    cfg, setup, step = _ours_setup(c, term, "auto")
    k = cfg.train.steps_per_dispatch
    state = jax.jit(setup.init, out_shardings=setup.shardings)()
    runners = {
        "ours": _in_memory_runner(c, step, state, per_dispatch=k),
        "numpyro": numpyro_runner(c, term),
        "numpyro-scan": numpyro_runner(c, term, per_dispatch=k),
        "numpyro-scan-2": numpyro_runner(c, term, per_dispatch=k, particles=2),
    }
    sec = _interleaved(runners, blocks, block_s)
    for key in ("ours", "numpyro-scan", "numpyro-scan-2"):
        sec[key] /= k  # a call of that runner takes k steps
    return {**sec, "per_dispatch": k, "sparse": bool(setup.sparse)}


def _interleaved(runners, blocks, block_s):
    """Median over ``blocks`` rounds of each runner's seconds per step, the runners taking
    turns in blocks of ~``block_s`` seconds (no runner always first)."""
    steps = {}
    for key, run in runners.items():  # compile and warm each, then size its blocks
        for i in range(9):
            run(i)
        t = time.perf_counter()
        for i in range(20):
            run(i)
        steps[key] = max(20, int(block_s / ((time.perf_counter() - t) / 20)))
    keys = list(runners)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for b in range(blocks):
        for key in keys[b % len(keys) :] + keys[: b % len(keys)]:
            t = time.perf_counter()
            for i in range(steps[key]):
                runners[key](i)
            times[key].append((time.perf_counter() - t) / steps[key])
    return {k: statistics.median(v) for k, v in times.items()}


def e2e_dataset(c):
    """Parquet of 2M rows, generated once (in the parent, so no worker's RSS includes it)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 2_000_000
    parquet = CACHE / f"e2e_{c}.parquet"
    if not parquet.exists():
        CACHE.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        cols = {f"x{j}": rng.normal(size=rows).astype(np.float32) for j in range(DENSE_D)}
        cols["g"] = _zipf_ids(rng, rows, c)
        cols["h"] = rng.integers(0, 1000, rows).astype(np.int32)
        cols["y"] = rng.normal(size=rows).astype(np.float32)
        pq.write_table(pa.table(cols), parquet, row_group_size=1 << 18)
    from omegaconf import OmegaConf

    from train import data as data_lib
    from train.config import DataConfig

    numeric = [f"x{j}" for j in range(DENSE_D)]
    data_cfg = OmegaConf.structured(
        DataConfig(path=str(parquet), numeric=numeric, categorical=["g", "h"], target="y")
    )
    data_lib.prepare(data_cfg, CACHE / f"e2e_run_{c}", "gaussian")  # cached for the workers
    return parquet


def _e2e_runner(cfg, setup, step, state, c, cores=None, block=True, per_dispatch=1):
    """``run(i) -> loss``: one dispatch on the next batch of Parquet -> prepare (vocab,
    encode, shuffle; cached) -> the service's data stage (``device_batches``) -> step:
    ``per_dispatch`` steps, their batches stacked (``train.dispatch``). ``block`` as in
    :func:`_in_memory_runner`."""
    from omegaconf import OmegaConf

    from train import data as data_lib
    from train.pipeline import device_batches

    parquet = e2e_dataset(c)
    data_cfg = OmegaConf.merge(cfg.data, {"path": str(parquet), "target": "y"})
    store, _ = data_lib.prepare(data_cfg, CACHE / f"e2e_run_{c}", "gaussian")
    holder = {"state": state}
    total = 10**7  # the timing loop decides how many steps it takes; the dataset is lazy
    cfg = OmegaConf.merge(cfg, {"data": {"batch_size": BATCH}, "train": {"seed": 0}})
    it = device_batches(
        store, cfg, step.prepare, step.batch_shardings, 0, total, cores, per_dispatch, step.stack
    )

    def run(_i):
        holder["state"], loss = step(holder["state"], next(it))
        if block:
            loss.block_until_ready()
        return loss

    return run


def worker_numpyro(c, term, steps, repeats, per_dispatch=1):
    runner = numpyro_runner(c, term, per_dispatch=per_dispatch)
    return _time_steps(runner, max(1, steps // per_dispatch), repeats) / per_dispatch


def numpyro_runner(c, term, block=True, per_dispatch=1, particles=1):
    """``run(i) -> loss``: one hand-written NumPyro SVI step, or with ``per_dispatch`` > 1
    that many, ``svi.update`` scanned (``lax.scan``) over batches stacked on device: what a
    NumPyro user would write to cut dispatches as the service does (``block`` as in
    :func:`_in_memory_runner`). ``particles``: draws per step (``Trace_ELBO(num_particles)``,
    vectorized); 2 evaluates the model as often as the service's antithetic pair does."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    def model(x, g, h, y=None):
        b0 = numpyro.sample("b0", dist.Normal(0, 1))
        lam = numpyro.sample("lam", dist.HalfNormal(1.0))
        beta = numpyro.sample("beta", dist.Normal(0, lam).expand([DENSE_D]).to_event(1))
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        if term == "random_effects":
            theta = numpyro.sample("theta", dist.Normal(0, s).expand([c]).to_event(1))
            effect = theta[g]
        elif term == "embedding":
            theta = numpyro.sample("theta", dist.Normal(0, s).expand([c, EMBED_DIM]).to_event(2))
            effect = theta[g].sum(1)
        else:
            theta = numpyro.sample(
                "theta", dist.Normal(0, s).expand([c + 1000, EMBED_DIM]).to_event(2)
            )
            v1, v2 = theta[g], theta[h + c]
            effect = (v1 * v2).sum(1)
        sigma = numpyro.sample("sigma", dist.Exponential(1.0))
        mu = b0 + x @ beta + effect
        with numpyro.plate("data", N_DATA, subsample_size=x.shape[0]):
            numpyro.sample("obs", dist.Normal(mu, sigma), obs=y)

    batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in _batches(c)]
    svi = SVI(model, AutoNormal(model), optax.adam(1e-2), Trace_ELBO(num_particles=particles))
    state = svi.init(jax.random.PRNGKey(0), **batches[0])
    update = jax.jit(svi.update)
    if per_dispatch > 1:
        batches = [
            {key: jnp.stack([b[key] for b in group]) for key in group[0]}
            for group in dispatch_groups(batches, per_dispatch)
        ]

        def scanned(state, stacked):
            return jax.lax.scan(lambda s, b: svi.update(s, **b), state, stacked)

        many = jax.jit(scanned)
        update = lambda state, **stacked: many(state, stacked)  # noqa: E731
    holder = {"state": state}

    def run(i):
        holder["state"], loss = update(holder["state"], **batches[i % len(batches)])
        if block:
            loss.block_until_ready()
        return loss

    return run


UPSTREAM_WORKER = """
import json, sys, time, statistics
import jax, jax.numpy as jnp, numpy as np, optax
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoNormal
from blayers.layers import AdaptiveLayer, InterceptLayer, RandomEffectsLayer, EmbeddingLayer
from blayers.links import gaussian_link
from blayers.vi_infer import Batched_Trace_ELBO
c, term, steps, repeats, B, D, M, N = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                       int(sys.argv[4]), 4096, 32, 8, 10_000_000)
def model(x, g, y=None):  # upstream layers return (n, 1): y is passed as (n, 1) to match
    mu = InterceptLayer()("b", ) + AdaptiveLayer()("x", x)
    if term == "random_effects":
        mu = mu + RandomEffectsLayer()("g", g, c)
    else:
        mu = mu + EmbeddingLayer()("g", g, c, M).sum(axis=1, keepdims=True)
    return gaussian_link(mu, y)
rng = np.random.default_rng(0)
batches = [dict(x=jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
                g=jnp.asarray((rng.zipf(1.2, size=B) - 1) % c, jnp.int32),
                y=jnp.asarray(rng.normal(size=(B, 1)), jnp.float32)) for _ in range(8)]
svi = SVI(model, AutoNormal(model), optax.adam(1e-2), Batched_Trace_ELBO(N, batch_size=B))
state = svi.init(jax.random.PRNGKey(0), **batches[0])
update = jax.jit(svi.update)
def run(i):
    global state
    state, loss = update(state, **batches[i % 8]); loss.block_until_ready()
run(0); t = time.perf_counter(); run(1); one = time.perf_counter() - t
if one > 2.0: steps, repeats = 2, 1
times = []
for _ in range(repeats):
    t = time.perf_counter()
    for i in range(steps): run(i)
    times.append((time.perf_counter() - t) / steps)
from pathlib import Path
hwm = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")]
print(json.dumps({"s_per_step": statistics.median(times),
                  "peak_rss_mb": int(hwm[0].split()[1]) / 1024}))
"""


def ensure_upstream_venv() -> Path | None:
    python = UPSTREAM_VENV / "bin" / "python"
    if python.exists():
        return python
    CACHE.mkdir(exist_ok=True)
    print("creating a venv with upstream blayers from PyPI (first run only) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(UPSTREAM_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "blayers"], check=True)
    except subprocess.CalledProcessError as err:
        print(f"upstream blayers unavailable: {err}", flush=True)
        return None
    return python


def run_config(path, c, term, mode, steps, repeats) -> dict:
    env = worker_env()
    if path == "upstream":
        if term == "fm":
            return {"error": "n/a"}
        if UPSTREAM_SITE:  # upstream installed with pip --target: this interpreter, that path
            python, env["PYTHONPATH"] = Path(sys.executable), UPSTREAM_SITE
        else:  # upstream is also called blayers: keep ours off its path
            python = ensure_upstream_venv()
            env.pop("PYTHONPATH", None)
        if python is None:
            return {"error": "n/a"}
        cmd = [str(python), "-c", UPSTREAM_WORKER, str(c), term, str(steps), str(repeats)]
    else:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            path,
            str(c),
            term,
            mode,
            str(steps),
            str(repeats),
        ]
    return _run_worker(cmd, env, timeout=1800)


def worker_env() -> dict[str, str]:
    # this repo first; an existing PYTHONPATH (packages installed with pip --target) after it
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": PLATFORM}
    env.pop("XLA_FLAGS", None)
    return env


def _run_worker(cmd: list[str], env: dict[str, str], timeout: int) -> dict:
    """Run one worker process; its last stdout line is its JSON result, or an error cell."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(CACHE)
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]
        return {"error": tail[0][:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def combine_rounds(results: list[dict]) -> dict:
    """Median seconds per step over rounds, peak RSS the largest seen; an error if none ran."""
    ok = [r for r in results if "s_per_step" in r]
    if not ok:
        return results[0] if results else {"error": "-"}
    return {
        "s_per_step": statistics.median(r["s_per_step"] for r in ok),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cats", default="1000,100000,1000000,10000000")
    parser.add_argument("--terms", default="random_effects,embedding,fm")
    parser.add_argument("--modes", default="step,e2e")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per cell")
    parser.add_argument("--skip-upstream", action="store_true")
    parser.add_argument("--paths", default="sparse,dense,numpyro,upstream")
    parser.add_argument(
        "--flat-blocks",
        type=int,
        default=30,
        help="blocks per size in the interleaved flatness check (0 skips it)",
    )
    parser.add_argument(
        "--platform",
        default="cpu",
        help="JAX_PLATFORMS for the workers, e.g. cuda; memory columns then read the "
        "accelerator's peak bytes in use instead of host RSS",
    )
    parser.add_argument(
        "--upstream-site",
        default="",
        help="a folder where upstream blayers was installed with pip --target (instead of "
        "creating a venv from PyPI, e.g. on a machine without a registry)",
    )
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--flatness-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--e2e-ratio-worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--peers-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--peer-blocks",
        type=int,
        default=0,
        help="after each term's rows, ours as shipped against NumPyro (one step per dispatch "
        "and scanned), interleaved in one process per size, this many blocks (0 skips it)",
    )
    args = parser.parse_args()
    global PLATFORM, UPSTREAM_SITE
    PLATFORM, UPSTREAM_SITE = args.platform, args.upstream_site
    CACHE.mkdir(exist_ok=True)  # the workers' working directory
    sys.path.insert(0, str(REPO))  # e2e_dataset prepares the data here, with this repo's code

    if args.flatness_worker:
        term, cats, blocks = args.flatness_worker
        sizes = [int(x) for x in cats.split(",")]
        print(json.dumps(worker_flatness(sizes, term, int(blocks))))
        return

    if args.peers_worker:
        c, term, blocks = args.peers_worker
        print(json.dumps(worker_peers(int(c), term, int(blocks))))
        return

    if args.e2e_ratio_worker:
        c, term, blocks, dedicated = args.e2e_ratio_worker
        print(json.dumps(worker_e2e_ratio(int(c), term, int(blocks), dedicated == "1")))
        return

    if args.worker:
        path, c, term, mode, steps, repeats = args.worker
        c, steps, repeats = int(c), int(steps), int(repeats)
        if path in ("sparse", "dense", "dense-mf"):
            sec = worker_ours(c, term, path == "sparse", mode, steps, repeats, path == "dense-mf")
        else:
            from train.config import TrainLoopConfig  # the service's steps per dispatch

            per_dispatch = TrainLoopConfig().steps_per_dispatch if path == "numpyro-scan" else 1
            sec = worker_numpyro(c, term, steps, repeats, per_dispatch)
        rss = peak_memory_mb()
        print(json.dumps({"s_per_step": sec, "peak_rss_mb": rss}))
        return

    cats = [int(float(x)) for x in args.cats.split(",")]
    paths = [p for p in args.paths.split(",") if not (args.skip_upstream and p == "upstream")]
    header = (
        f"{'term':<15}{'c':>10} {'mode':<5}"
        + "".join(f"{p + ' ex/s':>{_width(p)}}" for p in paths)
        + "".join(f"{'sparse/' + p:>{_width(p) + 8}}" for p in paths[1:])
        + (
            f"{'sparse RSS MB':>15}{'dense RSS MB':>14}"
            if PLATFORM == "cpu"
            else f"{'sparse dev MB':>15}{'dense dev MB':>14}"
        )
    )
    print(f"workers: JAX_PLATFORMS={PLATFORM}")
    print(header)
    print("-" * len(header))
    flat: list[tuple[str, dict]] = []
    e2e_ratio: list[tuple[str, int, bool, dict]] = []
    peers: list[tuple[str, int, dict]] = []
    for term in args.terms.split(","):
        for c in cats:
            for mode in args.modes.split(","):
                if mode == "e2e":
                    e2e_dataset(c)
                # paths take turns, round after round, so a slow spell of a shared machine
                # falls on all of them rather than on one; each cell is the median over rounds
                runs: dict[str, list[dict]] = {p: [] for p in paths}
                for _ in range(args.rounds):
                    for p in paths:
                        if mode == "e2e" and p not in ("sparse", "dense"):
                            continue
                        runs[p].append(run_config(p, c, term, mode, args.steps, args.repeats))
                row = {p: combine_rounds(r) for p, r in runs.items()}
                rate = {
                    p: BATCH / r["s_per_step"] if "s_per_step" in r else None
                    for p, r in row.items()
                }
                cells = "".join(
                    f"{rate[p]:>{_width(p)},.0f}" if rate[p] else f"{row[p]['error']:>{_width(p)}}"
                    for p in paths
                )
                ratios = "".join(
                    f"{rate['sparse'] / rate[p]:>{_width(p) + 7}.1f}x"
                    if rate[p] and rate.get("sparse")
                    else f"{'-':>{_width(p) + 8}}"
                    for p in paths[1:]
                )
                rss = "".join(
                    f"{row[p]['peak_rss_mb']:>15,.0f}"
                    if "peak_rss_mb" in row.get(p, {})
                    else f"{'-':>15}"
                    for p in ("sparse", "dense")
                )
                print(f"{term:<15}{c:>10} {mode:<5}{cells}{ratios}{rss}", flush=True)
        if "sparse" in paths and "step" in args.modes and len(cats) > 1 and args.flat_blocks:
            flat.append((term, run_flatness(term, cats, args.flat_blocks)))
        if args.peer_blocks:
            for c in cats:
                peers.append((term, c, run_peers(term, c, args.peer_blocks)))
        if "sparse" in paths and "e2e" in args.modes and args.flat_blocks:
            c = 1_000_000 if 1_000_000 in cats else max(cats)
            for dedicated in (False, True):
                result = run_e2e_ratio(term, c, args.flat_blocks, dedicated)
                e2e_ratio.append((term, c, dedicated, result))
    print_flatness(flat)
    print_e2e_ratio(e2e_ratio)
    print_peers(peers)


def _width(path: str) -> int:
    """A table column's width for ``path``: its header, ``<path> ex/s``, with room."""
    return max(15, len(path) + 7)


def run_flatness(term: str, cats: list[int], blocks: int) -> dict:
    sizes = ",".join(map(str, cats))
    cmd = [sys.executable, __file__, "--flatness-worker", term, sizes, str(blocks)]
    return _run_worker(cmd, worker_env(), timeout=3600)


def run_peers(term: str, c: int, blocks: int) -> dict:
    cmd = [sys.executable, __file__, "--peers-worker", str(c), term, str(blocks)]
    return _run_worker(cmd, worker_env(), timeout=3600)


def print_peers(results: list[tuple[str, int, dict]]) -> None:
    """Ours as shipped against hand-written NumPyro, one step per dispatch and scanned, all
    in one process taking turns in blocks (see ``worker_peers``)."""
    if not results:
        return
    print(
        "\nours as shipped against hand-written NumPyro, interleaved in one process, so all "
        "under blayers' XLA settings (blayers/xla_flags.py; ms per step):"
    )
    for term, c, sec in results:
        label = f"{term:<15} c={c:<11,}"
        if "error" in sec:
            print(f"{label} {sec['error']}")
            continue
        keys = ("ours", "numpyro", "numpyro-scan", "numpyro-scan-2")
        ours, one, scan, two = (sec[k] * 1e3 for k in keys)
        path = "sparse" if sec["sparse"] else "dense"
        print(
            f"{label} ours ({path}, {sec['per_dispatch']} per dispatch) {ours:.3f}, NumPyro "
            f"{one:.3f} ({one / ours:.2f}x), NumPyro scanned {scan:.3f} ({scan / ours:.2f}x); "
            f"against the faster {min(one, scan) / ours:.2f}x; NumPyro scanned at two draws "
            f"per step {two:.3f} ({two / ours:.2f}x)",
            flush=True,
        )


def run_e2e_ratio(term: str, c: int, blocks: int, dedicated_cores: bool) -> dict:
    flag = str(int(dedicated_cores))
    cmd = [sys.executable, __file__, "--e2e-ratio-worker", str(c), term, str(blocks), flag]
    return _run_worker(cmd, worker_env(), timeout=3600)


def print_flatness(flat: list[tuple[str, dict]]) -> None:
    """Sparse step-only throughput at each size relative to the smallest, all sizes in one
    process taking turns in blocks (see ``worker_flatness``)."""
    if not flat:
        return
    print("\nsparse step, table sizes interleaved in one process (rate / rate at smallest c):")
    for term, sec in flat:
        if "error" in sec:
            print(f"{term:<15} {sec['error']}")
            continue
        base = min(sec, key=int)
        cells = "  ".join(
            f"c={int(c):,}: {BATCH / s / 1e6:.2f} M ex/s ({sec[base] / s:.2f}x)"
            for c, s in sec.items()
        )
        print(f"{term:<15} {cells}", flush=True)


def print_e2e_ratio(results: list[tuple[str, int, bool, dict]]) -> None:
    """Sparse end-to-end against step-only throughput, both in one process taking turns in
    blocks (see ``worker_e2e_ratio``), with the service's default placement of threads and
    with ``data.dedicated_cores=true``."""
    if not results:
        return
    print("\nsparse step-only and end to end, interleaved in one process:")
    print(f"(data.dedicated_cores=true: {dedicated_cores_line()})")
    for term, c, dedicated, sec in results:
        label = f"{term:<15} c={c:,} {'dedicated cores' if dedicated else 'default':<16}"
        if "error" in sec:
            print(f"{label} {sec['error']}")
            continue
        if dedicated and not sec["split"]:
            print(f"{label} no split on this machine")
            continue
        step, step_k, e2e, e2e_1 = (BATCH / sec[k] for k in ("step", "step-k", "e2e", "e2e-1"))
        k = sec["per_dispatch"]
        print(
            f"{label} step-only {step / 1e6:.2f} M ex/s, e2e {e2e / 1e6:.2f} M ex/s "
            f"({e2e / step:.2f}x; {k} steps per dispatch), "
            f"e2e one step per dispatch {e2e_1 / 1e6:.2f} M ex/s ({e2e_1 / step:.2f}x); "
            f"step-only {k} per dispatch {step_k / 1e6:.2f} M ex/s (e2e {e2e / step_k:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
