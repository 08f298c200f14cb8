"""``data.dedicated_cores`` (train.cores): which cores the data pipeline gets, that XLA's pool
and the pipeline's threads land on their own cores, and that training's results do not
change."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from tests.service_helpers import run_with_devices, small_dataset
from train.cores import (
    CoreSplit,
    _cpu_devices_requested,
    pipeline_threads,
    reserve,
    split_cores,
)

TWO_CORES = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs at least two usable cores"
)


def test_pipeline_gets_the_last_cores_and_the_step_keeps_at_least_one():
    assert split_cores({0, 1}, 2) == CoreSplit(frozenset({0}), frozenset({1}))
    assert split_cores(set(range(16)), 2) == CoreSplit(frozenset(range(14)), frozenset({14, 15}))
    assert split_cores({3, 5, 9}, 1) == CoreSplit(frozenset({3, 5}), frozenset({9}))
    assert split_cores({0, 1, 2, 3}, 0).data == {3}  # always one pipeline thread
    assert split_cores({4}, 2) is None
    assert [pipeline_threads(p, c) for p, c in [(2, 2), (2, 16), (0, 8), (4, 1)]] == [1, 2, 1, 1]


def test_cpu_devices_come_from_jax_config_then_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    assert _cpu_devices_requested(-1) == 8
    assert _cpu_devices_requested(2) == 2
    monkeypatch.setenv("XLA_FLAGS", "")
    assert _cpu_devices_requested(-1) == 1


def test_nothing_is_moved_once_the_backend_exists():
    jax.devices()
    split, line = reserve(2)
    assert split is None
    assert "created before training started" in line


@TWO_CORES
def test_pool_on_compute_cores_pipeline_on_data_cores_main_thread_on_all():
    code = """
        import json, os, threading
        import jax  # importing starts threads of its own, before any backend exists
        from train.cores import reserve
        from train.pipeline import iterate
        before = set(os.listdir("/proc/self/task"))
        allowed = sorted(os.sched_getaffinity(0))
        split, line = reserve(2)
        pool = set(os.listdir("/proc/self/task")) - before  # made while creating the backend
        producers = []

        def batches(step):  # stands in for StepBatches: records where it ran
            producers.append(sorted(os.sched_getaffinity(0)))
            return step

        got = list(iterate(batches, 0, 12, 2, split))
        print(json.dumps({
            "compute": sorted(split.compute), "data": sorted(split.data), "line": line,
            "allowed": allowed, "main": sorted(os.sched_getaffinity(0)),
            "pool": [sorted(os.sched_getaffinity(int(t))) for t in pool if
                     os.path.exists(f"/proc/self/task/{t}")],
            "producers": producers, "got": got,
        }))
    """
    out = run_with_devices(1, code)
    allowed = out["allowed"]
    assert out["data"] == allowed[-1:] and out["compute"] == allowed[:-1]
    assert f"pipeline threads on {out['data']}" in out["line"]
    assert out["pool"] and all(cores == out["compute"] for cores in out["pool"])
    assert out["main"] == allowed
    assert out["producers"] and all(cores == out["data"] for cores in out["producers"])
    assert out["got"] == list(range(12))


@TWO_CORES
def test_training_with_dedicated_cores_gives_the_same_posterior(tmp_path):
    data = small_dataset(tmp_path)
    results = {}
    for dedicated in (False, True):
        run = tmp_path / f"dedicated_{dedicated}"
        code = f"""
            import json
            from tests.service_helpers import small_config, load_params
            from train import loop
            cfg = small_config({str(data)!r}, {str(run)!r},
                               **{{"data.dedicated_cores": {dedicated}, "train.steps": 30}})
            lines = []
            loop.train(cfg, log=lines.append)
            params = {{k: v.tolist() for k, v in load_params(cfg.run_dir).items()}}
            print(json.dumps({{"lines": lines, "params": params}}))
        """
        results[dedicated] = run_with_devices(1, code)
    assert any("pipeline threads on" in line for line in results[True]["lines"])
    assert not any("data cores" in line for line in results[False]["lines"])
    for name, value in results[False]["params"].items():
        np.testing.assert_array_equal(results[True]["params"][name], value, err_msg=name)
