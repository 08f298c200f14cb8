"""The row-sparse step on an accelerator: throughput against batch size, beside the time the
bytes it touches need at the device's measured bandwidth, and beside hand-written NumPyro.

    python benchmarks/accelerator_step.py                       # on a GPU machine
    python benchmarks/accelerator_step.py --cats 1000 --batches 512,2048 --e2e-cats 1000  # smoke

The model and data are those of ``train_throughput.py`` (intercept + AdaptiveLayer over 32
dense features + one categorical term, gaussian link, Zipf ids), with the batch size varied.
Three ways to run the same step, each the median over blocks of at least ~0.3 s:

- ``waited``:    each step waited on before the next is dispatched (as ``train_throughput``);
- ``queued``:    steps dispatched back to back, waited on at the end of a block, as the
                 training loop runs them (it reads a loss only every ``log_every`` steps);
- ``scan K``:    K batches per dispatch, the service's ``lax.scan`` over the same step
                 (``train.steps_per_dispatch``, ``train.dispatch``): what dispatch costs on
                 top of the step.

The byte floor of a step is what it must move at least once: the batch's arrays (the dense
features twice, forward and backward), each touched table row's guide state and moments read
and written, its count read, and the dense parameters and their moments read and written;
divided by the bandwidth of a large on-device copy measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# blayers' XLA settings (the GPU scatter-add fix among them) apply only if it is imported
# before the backend starts, and main() starts it (copy bandwidth) before anything else
import blayers  # noqa: E402, F401, I001
import train_throughput as tt  # noqa: E402  (the shared model, data and runners)


def copy_bandwidth() -> float:
    """Bytes per second of ``y = x * a`` over 1 GiB on the default device (read + write)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1 << 28,), jnp.float32)
    scale = jax.jit(lambda x, a: x * a)
    scale(x, 1.0).block_until_ready()
    times = []
    for i in range(10):
        t = time.perf_counter()
        scale(x, 1.0 + i).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / min(times)


def block_seconds(run, min_s: float = 0.3, blocks: int = 5, steps_per_call: int = 1) -> float:
    """Median seconds per step over ``blocks`` blocks of at least ``min_s``, after warming;
    each block ends by waiting on the last loss, so queued steps are all counted."""
    for i in range(9):
        loss = run(i)
    loss.block_until_ready()
    t = time.perf_counter()
    for i in range(10):
        loss = run(i)
    loss.block_until_ready()
    n = max(10, int(min_s / ((time.perf_counter() - t) / 10)))
    out = []
    for _ in range(blocks):
        t = time.perf_counter()
        for i in range(n):
            loss = run(i)
        loss.block_until_ready()
        out.append((time.perf_counter() - t) / (n * steps_per_call))
    return statistics.median(out)


def step_bytes(setup, state, batch) -> int:
    """Bytes a step moves at least once (see the module's docstring)."""
    import jax

    from train.dedup import UNIQ

    moved = sum(v.nbytes for v in batch.values()) + batch["numeric"].nbytes
    tables = set(setup.sparse)
    for site in tables:
        k = len(batch[UNIQ + site])
        for leaf in jax.tree.leaves(state.params[site]):
            moved += 2 * k * leaf.dtype.itemsize * int(leaf.size // leaf.shape[0])
        moved += 4 * k  # the row's training count
    dense = {s: v for s, v in state.params.items() if s not in tables}
    moved += 2 * sum(x.nbytes for x in jax.tree.leaves((dense, state.opt_state)))
    return moved


def measure(term: str, c: int, batch: int, modes: list[str], k: int, bandwidth: float) -> dict:
    """Seconds per step of each mode for one (term, c, batch), and the byte floor."""
    import jax

    tt.BATCH = batch
    out: dict = {}
    _, setup, step = tt._ours_setup(c, term, True)
    for mode in modes:
        state = jax.jit(setup.init, out_shardings=setup.shardings)()
        if "bytes" not in out:
            out["bytes"] = step_bytes(setup, state, tt.prepared_batches(c, step)[0])
            out["floor"] = out["bytes"] / bandwidth
        if mode == "scan":
            out[mode] = block_seconds(
                tt._in_memory_runner(c, step, state, block=False, per_dispatch=k), steps_per_call=k
            )
        else:
            run = tt._in_memory_runner(c, step, state, block=mode == "waited")
            out[mode] = block_seconds(run)
        del state
    return out


def e2e_vs_step(term: str, c: int, batch: int, k: int) -> dict:
    """Seconds per step, queued, with batches held on device and fed by the service's data
    stage from Parquet, one step per dispatch and ``k`` (``e2e-scan``), taking turns in
    blocks in one process."""
    import jax

    tt.BATCH = batch
    cfg, setup, step = tt._ours_setup(c, term, True)
    tt.e2e_dataset(c)
    runners, per_call = {}, {"step": 1, "e2e": 1, "e2e-scan": k}
    for key in per_call:
        state = jax.jit(setup.init, out_shardings=setup.shardings)()
        runners[key] = (
            tt._in_memory_runner(c, step, state, block=False)
            if key == "step"
            else tt._e2e_runner(cfg, setup, step, state, c, block=False, per_dispatch=per_call[key])
        )
    times: dict[str, list[float]] = {key: [] for key in runners}
    keys = list(runners)
    for b in range(6):
        for key in keys[b % len(keys) :] + keys[: b % len(keys)]:
            times[key].append(block_seconds(runners[key], blocks=1, steps_per_call=per_call[key]))
    return {key: statistics.median(v) for key, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cats", default="10000000")
    parser.add_argument("--terms", default="random_effects,embedding,fm")
    parser.add_argument("--batches", default="4096,16384,65536,262144")
    parser.add_argument("--modes", default="waited,queued,scan")
    from train.config import TrainLoopConfig

    parser.add_argument(
        "--scan",
        type=int,
        default=TrainLoopConfig().steps_per_dispatch,
        help="K batches per dispatch (default: the service's train.steps_per_dispatch)",
    )
    parser.add_argument("--peers", default="numpyro", help="'numpyro' or '' (none)")
    parser.add_argument("--e2e-cats", default="1000000", help="'' skips step vs e2e")
    parser.add_argument("--e2e-batches", default="4096,65536")
    args = parser.parse_args()
    import jax

    tt.CACHE.mkdir(exist_ok=True)
    device = jax.devices()[0]
    bandwidth = copy_bandwidth()
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    print(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write, 1 GiB)")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}\n")
    modes = args.modes.split(",")
    head = (
        f"{'term':<15}{'c':>10}{'batch':>8}"
        + "".join(f"{m + ' M ex/s':>16}" for m in modes)
        + (f"{'numpyro M ex/s':>16}{'best/numpyro':>14}" if args.peers else "")
        + f"{'MB/step':>9}{'floor M ex/s':>14}{'best/floor':>12}"
    )
    print(head)
    print("-" * len(head), flush=True)
    for term in [t for t in args.terms.split(",") if t]:
        for c in (int(float(x)) for x in args.cats.split(",")):
            for batch in (int(x) for x in args.batches.split(",")):
                try:
                    r = measure(term, c, batch, modes, args.scan, bandwidth)
                except Exception as err:  # one cell's failure (memory, say) is a cell
                    print(f"{term:<15}{c:>10}{batch:>8}  failed: {str(err)[:80]}", flush=True)
                    continue
                rates = {m: batch / r[m] / 1e6 for m in modes}
                best = max(rates.values())
                cells = "".join(f"{rates[m]:>16.2f}" for m in modes)
                if args.peers:
                    try:
                        tt.BATCH = batch
                        peer = batch / block_seconds(tt.numpyro_runner(c, term, block=False)) / 1e6
                        cells += f"{peer:>16.2f}{best / peer:>13.1f}x"
                    except Exception as err:
                        cells += f"{'failed':>16}{'-':>14}"
                        print(f"  numpyro: {str(err)[:100]}")
                floor = batch / r["floor"] / 1e6
                print(
                    f"{term:<15}{c:>10}{batch:>8}{cells}{r['bytes'] / 1e6:>9.2f}"
                    f"{floor:>14,.0f}{best / floor:>11.3f}x",
                    flush=True,
                )
    if args.e2e_cats:
        print("\nsparse step, queued: batches on device vs fed by the data stage, interleaved")
        for c in (int(float(x)) for x in args.e2e_cats.split(",")):
            for batch in (int(x) for x in args.e2e_batches.split(",")):
                try:
                    sec = e2e_vs_step("random_effects", c, batch, args.scan)
                except Exception as err:
                    print(f"c={c:,} batch {batch}: failed: {str(err)[:100]}", flush=True)
                    continue
                step, e2e, scan = (batch / sec[key] / 1e6 for key in ("step", "e2e", "e2e-scan"))
                print(
                    f"random_effects c={c:,} batch {batch}: step-only {step:.2f} M ex/s, "
                    f"e2e {e2e:.2f} M ex/s ({e2e / step:.2f}x), "
                    f"e2e {args.scan} per dispatch {scan:.2f} M ex/s ({scan / step:.2f}x)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
