"""train/distributed.py: each process's place from config, JAX variables, SLURM or a
Kubernetes Indexed Job; and a process's rows assembled into the global batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from omegaconf import OmegaConf

from train import distributed
from train.config import DistributedConfig


def cfg(**values):
    c = OmegaConf.structured(DistributedConfig)
    for k, v in values.items():
        c[k] = v
    return c


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node7", ["node7"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[8-10],b-x5,c[1-2]d", ["a8", "a9", "a10", "b-x5", "c1d", "c2d"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ],
)
def test_slurm_hostlists_expand_like_scontrol(nodelist, hosts):
    assert distributed.expand_hostlist(nodelist) == hosts


def test_bad_hostlist_names_it():
    with pytest.raises(ValueError, match=r"gpu\[a-b\]"):
        distributed.expand_hostlist("gpu[a-b]")


SLURM_STEP = {
    "SLURM_JOB_ID": "123456",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
}


def test_slurm_step_places_the_process():
    p = distributed.resolve_placement(cfg(), SLURM_STEP)
    assert (p.coordinator, p.num_processes, p.process_id) == ("gpu07:23456", 4, 3)
    assert p.multi_process and distributed.wants_distributed(cfg(), SLURM_STEP)
    port = {**SLURM_STEP, "BLAYERS_COORDINATOR_PORT": "9999"}
    assert distributed.resolve_placement(cfg(), port).coordinator == "gpu07:9999"
    kwargs = distributed.initialize_kwargs(cfg(heartbeat_timeout_s=30), SLURM_STEP)
    assert kwargs == {
        "coordinator_address": "gpu07:23456",
        "num_processes": 4,
        "process_id": 3,
        "heartbeat_timeout_seconds": 30,
        "initialization_timeout": 300,
    }


def test_slurm_batch_script_itself_and_plain_runs_stay_single_process():
    batch_shell = {k: v for k, v in SLURM_STEP.items() if not k.startswith("SLURM_STEP")}
    assert not distributed.wants_distributed(cfg(), batch_shell)
    assert not distributed.wants_distributed(cfg(), {})
    one_task = {**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}
    assert not distributed.resolve_placement(cfg(), one_task).multi_process  # srun -n 1
    assert not distributed.wants_distributed(cfg(), {"JAX_NUM_PROCESSES": "1"})
    assert distributed.wants_distributed(cfg(enabled=True), {})  # e.g. Cloud TPU detection
    assert not distributed.wants_distributed(cfg(enabled=False), SLURM_STEP)


def test_kubernetes_indexed_job_places_the_process():
    env = {
        "JAX_COORDINATOR_ADDRESS": "blayers-train-0.blayers-train:8476",
        "JAX_NUM_PROCESSES": "2",
        "JOB_COMPLETION_INDEX": "1",
    }
    p = distributed.resolve_placement(cfg(), env)
    assert (p.coordinator, p.num_processes, p.process_id) == (
        "blayers-train-0.blayers-train:8476",
        2,
        1,
    )
    assert "process_id from Kubernetes Indexed Job" in p.sources


def test_config_beats_jax_variables_beat_slurm():
    env = {**SLURM_STEP, "JAX_PROCESS_ID": "1", "JAX_COORDINATOR_ADDRESS": "head:1234"}
    p = distributed.resolve_placement(cfg(num_processes=8), env)
    assert (p.coordinator, p.num_processes, p.process_id) == ("head:1234", 8, 1)
    assert p.sources == (
        "coordinator from JAX_* environment",
        "num_processes from config",
        "process_id from JAX_* environment",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({**SLURM_STEP, "SLURM_PROCID": "4"}, r"process_id=4 is outside \[0, 4\).*SLURM"),
        ({**SLURM_STEP, "SLURM_PROCID": "three"}, r"SLURM_PROCID='three' is not an integer"),
        ({"JAX_COORDINATOR_ADDRESS": "head"}, r"'head' must be host:port"),
        ({"JAX_NUM_PROCESSES": "0"}, r"num_processes=0 must be >= 1"),
    ],
)
def test_bad_placement_is_named(env, message):
    with pytest.raises(ValueError, match=message):
        distributed.resolve_placement(cfg(), env)


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError, match=r"distributed.heartbeat_timeout_s=0 must be at least"):
        distributed.initialize_kwargs(cfg(heartbeat_timeout_s=0), SLURM_STEP)


def test_one_processs_rows_are_the_global_batch_placed_by_the_step():
    mesh = Mesh(np.asarray(jax.devices()).reshape(8), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    local = {
        "numeric": np.arange(32, dtype=np.float32).reshape(16, 2),
        "categorical": np.arange(16, dtype=np.int32).reshape(16, 1),
        "host_only": np.zeros(3),
    }
    shardings = {"numeric": rows, "categorical": rows}
    placed = distributed.global_batch(local, shardings)
    assert set(placed) == {"numeric", "categorical"}
    for name, array in placed.items():
        assert array.sharding == rows and len(array.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(array), local[name])
    # the step's own argument path places numpy rows: they are handed over as they are
    handed = distributed.step_inputs(local, shardings)
    assert all(handed[k] is local[k] for k in shardings) and "host_only" not in handed
