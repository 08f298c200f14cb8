"""The cost of growing a table when a run continues on new data (``init_from``).

For a random-effect table of ``N`` known rows growing by ``M`` new ones, on 8 (fake CPU)
devices with the rows split 8 ways, it times and sizes the two pieces of a warm start that
depend on the table's size:

- the vocabulary's extension (:meth:`train.vocab.Vocab.extended`: ``N`` known string values,
  a new partition's vocabulary of ``M`` new and ``M`` known values), on the host;
- the carried state (:func:`train.warm_start.carry_over`: guide ``loc`` and ``raw_scale``
  and Adam's two moments of each, copied block by block into the grown, sharded state), with
  XLA's own account of the compiled copy's memory per device: its arguments, outputs and
  temporaries. A copy that gathered a table onto one device would need a temporary of the
  whole table there.

    .venv/bin/python benchmarks/warm_start_growth.py [--sizes 1000000,10000000] [--grow 1000000]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blayers.sharding import make_mesh
from train.state import TrainState
from train.vocab import Vocab
from train.warm_start import carry_over, copy_fn

MB = 1 << 20


def padded(rows: int, split: int) -> int:
    return -(-rows // split) * split


def states(known: int, grown: int, mesh: jax.sharding.Mesh) -> tuple[Any, Any, Any, Any]:
    rows_spec = NamedSharding(mesh, PartitionSpec("model"))
    whole = NamedSharding(mesh, PartitionSpec())
    optimizer = optax.adam(0.01)

    def make(rows: int) -> TrainState:
        params = {
            "table": {"loc": jnp.zeros((rows, 1)), "raw_scale": jnp.zeros((rows, 1))},
            "scale": {"loc": jnp.zeros(()), "raw_scale": jnp.zeros(())},
        }
        return TrainState(
            jnp.zeros((), jnp.int32), params, optimizer.init(params), jax.random.PRNGKey(0)
        )

    def shardings(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, _: rows_spec if "'table'" in jax.tree_util.keystr(p) else whole, tree
        )

    split = mesh.shape["model"]
    old_shape = jax.eval_shape(lambda: make(padded(known + 1, split)))
    new_shape = jax.eval_shape(lambda: make(padded(grown + 1, split)))
    old_sh, new_sh = shardings(old_shape), shardings(new_shape)
    old = jax.jit(lambda: make(padded(known + 1, split)), out_shardings=old_sh)()
    new = jax.jit(lambda: make(padded(grown + 1, split)), out_shardings=new_sh)()
    return old, new, old_sh, new_sh


def vocab_seconds(known: int, grow: int) -> float:
    values = pa.array([f"user{i:09d}" for i in range(known)])
    base = Vocab("user", values, np.ones(known, np.int64))
    partition = pa.array(
        [f"user{i:09d}" for i in range(known - grow, known)]
        + [f"user{i:09d}" for i in range(known, known + grow)]
    )
    new = Vocab("user", partition, np.ones(len(partition), np.int64))
    start = time.perf_counter()
    out = base.extended(new)
    took = time.perf_counter() - start
    assert out.size == known + grow
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--grow", type=int, default=1_000_000)
    args = parser.parse_args()
    mesh = make_mesh({"data": 1, "model": -1})
    print(
        f"{'known rows':>11} {'new rows':>9} {'vocab s':>8} {'copy s':>7} {'compile s':>10} "
        f"{'table MB':>9} {'per-device MB: args':>20} {'out':>6} {'temp':>6}"
    )
    for known in (int(s) for s in args.sizes.split(",")):
        grown = known + args.grow
        vocab_s = vocab_seconds(known, args.grow)
        old, new, old_sh, new_sh = states(known, grown, mesh)
        blocks = {"table": [(0, 0, known)]}
        start = time.perf_counter()
        out = carry_over(old, new, blocks, old_sh, new_sh)
        jax.block_until_ready(out)
        first = time.perf_counter() - start
        _, new2, _, _ = states(known, grown, mesh)
        start = time.perf_counter()
        out = carry_over(old, new2, blocks, old_sh, new_sh)
        jax.block_until_ready(out)
        copy_s = time.perf_counter() - start
        table_mb = 6 * 4 * padded(grown + 1, 8) / MB  # loc, raw_scale and 2 moments of each

        stats = copy_fn(blocks, old_sh, new_sh).lower(old, new2, {}).compile().memory_analysis()
        print(
            f"{known:>11,} {args.grow:>9,} {vocab_s:>8.2f} {copy_s:>7.2f} {first - copy_s:>10.2f} "
            f"{table_mb:>9.0f} {stats.argument_size_in_bytes / MB:>20.0f} "
            f"{stats.output_size_in_bytes / MB:>6.0f} {stats.temp_size_in_bytes / MB:>6.0f}"
        )


if __name__ == "__main__":
    main()
