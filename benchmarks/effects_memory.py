"""Per-level effects (``blayers-effects``): peak memory and time against the table size.

    python benchmarks/effects_memory.py                       # 10^5, 10^6, 10^7 levels
    python benchmarks/effects_memory.py --levels 100000,1000000

For each size a dataset with that many distinct ``u`` levels (each level in two rows) and a
gaussian target is written to ``benchmarks/.cache``, a random-effects run is trained for a
few steps (row-sparse, as ``sparse: auto`` picks from 10^5 rows), and in separate processes
``blayers-summary`` (restore only: what holding the run costs) and ``blayers-effects`` (restore
plus writing every level) report their peak RSS (``VmHWM``). The effects' own cost is the
difference: what streaming the vocabulary and the rows adds to holding the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

WORKER = """
import sys, json
from pathlib import Path
from train import cli
tool = sys.argv[1]
sys.argv = [tool] + sys.argv[2:]
try:
    getattr(cli, tool + "_main")()
except SystemExit:
    pass
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print(json.dumps({"peak_mb": int(line.split()[1]) / 1024}))
"""


def dataset(levels: int, root: Path) -> Path:
    path = root / f"u{levels}" / "train.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        u = np.repeat(np.arange(levels, dtype=np.int64), 2)
        effect = rng.normal(0, 0.5, levels)
        y = (1.0 + effect[u] + rng.normal(0, 1, u.size)).astype(np.float32)
        pq.write_table(pa.table({"u": u * 7 + 3, "y": y}), path, row_group_size=1 << 20)
    return path


def run_tool(tool: str, *args: str) -> tuple[dict, float]:
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, tool, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="100000,1000000,10000000")
    args = parser.parse_args()
    root = HERE / ".cache" / "effects"
    print(f"{'levels':>11} {'restore MB':>11} {'effects MB':>11} {'added MB':>9} {'effects s':>10}")
    for levels in [int(x) for x in args.levels.split(",")]:
        data = dataset(levels, root)
        run = root / f"u{levels}" / "run"
        terms = "[{layer:InterceptLayer,name:bias},{layer:RandomEffectsLayer,name:u,inputs:[u]}]"
        run_tool(
            "train",
            f"run_dir={run}",
            f"data.path={data}",
            "data.numeric=[]",
            "data.categorical=[u]",
            "model.link=gaussian",
            f"model.terms={terms}",
            "train.steps=20",
            "train.progress=false",
            "checkpoint.every=20",
            "data.batch_size=4096",
        )
        restore, _ = run_tool("summary", f"run_dir={run}", "draws=10")
        written, wall = run_tool("effects", f"run_dir={run}", "term=u")
        rows = pq.read_metadata(run / "effects" / "u.parquet").num_rows
        assert rows == levels, (rows, levels)
        added = written["peak_mb"] - restore["peak_mb"]
        print(
            f"{levels:>11,} {restore['peak_mb']:>11.0f} {written['peak_mb']:>11.0f} "
            f"{added:>9.0f} {wall:>10.1f}"
        )


if __name__ == "__main__":
    main()
