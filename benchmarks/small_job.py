"""Wall time of each stage of a small job, with the persistent compilation cache off, cold
and warm.

A small job is mostly start-up and compilation, repeated in every process: train, summary
and score are each their own command. This generates ``--rows`` rows of the default data
(``train/synth.py``), then runs ``blayers-train`` (``--steps`` steps of the default model),
``blayers-summary`` and ``blayers-score`` three times, each time in a new run directory:

- ``off``: ``BLAYERS_COMPILATION_CACHE=off``;
- ``cold``: the cache on, in an empty directory;
- ``warm``: the same directory again, so every program comes from disk.

    .venv/bin/python benchmarks/small_job.py [--rows 100000] [--steps 1000]

It prints each stage's wall time (seconds) per pass and the warm pass's ratio to ``off``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train import synth  # noqa: E402

STAGES = ("train", "summary", "score")


def run(tool: str, args: list[str], env: dict[str, str]) -> float:
    code = f"from train.cli import {tool}_main; {tool}_main()"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    if proc.returncode != 0:
        sys.exit(f"blayers-{tool} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def one_pass(tmp: Path, data: Path, name: str, cache: str, steps: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({"BLAYERS_COMPILATION_CACHE": cache, "PYTHONPATH": str(REPO)})
    run_dir = tmp / name
    common = [f"run_dir={run_dir}"]
    return {
        "train": run(
            "train",
            [*common, f"data.path={data}", f"train.steps={steps}", "train.progress=false"],
            env,
        ),
        "summary": run("summary", common, env),
        "score": run("score", [*common, f"data.path={data}", f"output={run_dir}/scores"], env),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data" / "train.parquet"
        synth.generate(data, args.rows)
        cache = str(tmp / "cache")
        passes = {
            "off": one_pass(tmp, data, "off", "off", args.steps),
            "cold": one_pass(tmp, data, "cold", cache, args.steps),
            "warm": one_pass(tmp, data, "warm", cache, args.steps),
        }
    print(f"{args.rows:,} rows, {args.steps:,} steps of the default model; wall seconds")
    print(f"{'stage':<10}" + "".join(f"{p:>10}" for p in passes) + f"{'warm/off':>10}")
    for stage in (*STAGES, "total"):
        times = {p: (sum(t.values()) if stage == "total" else t[stage]) for p, t in passes.items()}
        print(
            f"{stage:<10}"
            + "".join(f"{times[p]:>10.1f}" for p in passes)
            + f"{times['warm'] / times['off']:>10.2f}"
        )


if __name__ == "__main__":
    main()
