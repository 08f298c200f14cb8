"""What ``train.non_finite.policy=skip`` costs per step: the guarded step (a finiteness check
of the loss and every gradient, and a select of old vs new state) against the plain one.

    python benchmarks/non_finite_overhead.py                  # ~3 minutes on 2 cores
    python benchmarks/non_finite_overhead.py --cats 1000,1000000 --blocks 15

The model and batches are ``train_throughput.py``'s (gaussian, 32 dense features, one random-
effects table of ``c`` rows, batch 4096). Both steps of a row run in ONE process, taking turns
in ~0.3 s blocks, so a slow spell of a shared machine falls on both alike; each cell is the
median over blocks, and the ratio is guarded / plain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_throughput as tt  # the same model, batches and runner


def seconds_per_step(run, block_s: float = 0.3) -> float:
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < block_s:
        run(n)
        n += 1
    return (time.perf_counter() - t0) / n


def measure(c: int, sparse: bool, blocks: int) -> tuple[float, float]:
    import jax

    _, setup, plain = tt._ours_setup(c, "random_effects", sparse)
    guarded = _guarded_like(setup, c)
    runs = {}
    for name, step in (("plain", plain), ("guarded", guarded)):
        state = jax.jit(setup.init, out_shardings=setup.shardings)()
        runs[name] = tt._in_memory_runner(c, step, state)
        for i in range(10):  # compile and warm every batch's shapes
            runs[name](i)
    times: dict[str, list[float]] = {"plain": [], "guarded": []}
    for _ in range(blocks):
        for name in ("plain", "guarded"):
            times[name].append(seconds_per_step(runs[name]))
    return statistics.median(times["plain"]), statistics.median(times["guarded"])


def _guarded_like(setup, c):
    """The guarded step, with the vocabulary counts ``train_throughput`` gives the plain one."""
    import numpy as np

    from train.step import make_train_step

    ranks = np.arange(1, c, dtype=np.float32)
    np.power(ranks, 1.2, out=ranks)
    np.divide(np.float32(tt.N_DATA), ranks, out=ranks)
    g_counts = ranks.astype(np.int64) + 1
    counts = {"g": g_counts, "h": np.full(999, tt.N_DATA // 999)}
    return make_train_step(setup, counts, skip_non_finite=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cats", default="1000,100000,1000000")
    parser.add_argument("--blocks", type=int, default=9)
    args = parser.parse_args()
    import jax

    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    print(f"{'path':<8} {'categories':>11} {'plain ms/step':>14} {'skip ms/step':>13} {'ratio':>6}")
    for sparse in (True, False):
        for c in (int(x) for x in args.cats.split(",")):
            if not sparse and c > 1_000_000:
                continue
            plain, guarded = measure(c, sparse, args.blocks)
            path = "sparse" if sparse else "dense"
            print(
                f"{path:<8} {c:>11,} {plain * 1e3:>14.2f} {guarded * 1e3:>13.2f} "
                f"{guarded / plain:>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
