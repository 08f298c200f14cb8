"""Small configs and datasets for service tests, and a runner for other device counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from train import synth
from train.config import Config, ScoreConfig

REPO = Path(__file__).resolve().parent.parent
SMALL_TERMS = [
    {"layer": "InterceptLayer", "name": "bias"},
    {"layer": "AdaptiveLayer", "name": "dense", "inputs": ["x1", "x2", "x3", "x4"]},
    {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
    {"layer": "RandomEffectsLayer", "name": "region", "inputs": ["region"]},
    {"layer": "FMLayer", "name": "fm", "inputs": ["user", "item"], "low_rank_dim": 2},
]


def small_dataset(directory: Path, rows: int = 4000, seed: int = 0) -> Path:
    path = directory / "train.parquet"
    if not path.exists():
        synth.generate(path, rows, seed)
    return path


def quiet_config(data_path: Path, run_dir: Path, settings: dict[str, Any]) -> Any:
    """A quiet, synchronous config for a test run: ``settings`` are dotted keys."""
    cfg = OmegaConf.structured(Config)
    cfg.run_dir = str(run_dir)
    cfg.data.path = str(data_path)
    cfg.train.progress = False
    cfg.checkpoint.async_save = False
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def small_config(data_path: Path, run_dir: Path, **overrides: Any) -> Any:
    settings = {
        "data.numeric": ["x1", "x2", "x3", "x4"],
        "data.categorical": ["user", "item", "region"],
        "data.batch_size": 64,
        "data.shuffle_block": 8,
        "model.link": "logit",
        "model.terms": SMALL_TERMS,
        "train.steps": 20,
        "train.log_every": 5,
        "checkpoint.every": 10,
    }
    return quiet_config(data_path, run_dir, {**settings, **overrides})


def crossed_config(
    data: Path, run_dir: Path, categorical: list[str], link: str = "gaussian", **overrides: Any
) -> Any:
    """A config for :func:`train.synth.crossed_effects` data: intercept (+ slope on ``x`` when
    the data has it) + one random-effects term per id column, 3,000 steps of batch 256 on one
    device."""
    import pyarrow.parquet as pq

    numeric = ["x"] if "x" in pq.read_schema(data).names else []
    settings = {
        "data.numeric": numeric,
        "data.categorical": list(categorical),
        "data.batch_size": 256,
        "model.link": link,
        "model.terms": synth.crossed_terms(list(categorical), numeric),
        "train.steps": 3000,
        "train.log_every": 500,
        "checkpoint.every": 3000,
        # statistical fits on one of the fake devices: 3x faster than 8-way data parallel on
        # two cores, and the sharded paths have tests of their own
        "mesh.data": 1,
    }
    return quiet_config(data, run_dir, {**settings, **overrides})


def load_params(
    run_dir: Path, step: int | None = None, trust_model: str | None = None
) -> dict[str, np.ndarray]:
    """Guide params of a run's checkpoint as flat numpy arrays, read on this process."""
    from train.run import restore_run
    from train.state import guide_params

    _, state, _ = restore_run(run_dir, step, trust_model=trust_model)
    params = guide_params(state.params)
    return {f"{s}.{f}": np.asarray(v) for s, fields in params.items() for f, v in fields.items()}


def run_with_devices(devices: int, code: str, timeout: int = 300) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter with ``devices`` fake CPU devices; it must print one
    JSON line last. Returns that JSON."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_cpu_collective_call_terminate_timeout_seconds=120"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def score_cfg(run_dir: Path, path: Path, output: Path, **overrides: Any) -> Any:
    """A scoring config for a test: batch 256, 40 draws, ``overrides`` as dotted keys."""
    cfg = OmegaConf.structured(ScoreConfig)
    cfg.run_dir, cfg.output, cfg.data.path = str(run_dir), str(output), str(path)
    cfg.data.batch_size, cfg.draws = 256, 40
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def run_cli(
    tool: str, *args: str, timeout: int = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``blayers-<tool> args`` (train, summary, score, effects) in a fresh CPU process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    code = f"from train.cli import {tool}_main; {tool}_main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def refusal(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command printed, after checking it exited 2 with one line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
