"""Cluster recipes: the SLURM script under a stand-in srun, the Kubernetes manifests, the
image's pinned versions (placement itself: tests/test_distributed.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib

import pytest
import yaml
from omegaconf import OmegaConf
from packaging.requirements import Requirement

from launch.local import free_port
from tests.service_helpers import REPO
from train import distributed
from train.config import DistributedConfig

LAUNCH = REPO / "launch"


def cfg(**values):
    c = OmegaConf.structured(DistributedConfig)
    for k, v in values.items():
        c[k] = v
    return c


FAKE_SRUN = """#!{python}
# Stand-in for srun: starts SLURM_NTASKS copies of the command as one job step.
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
n = int(os.environ["SLURM_NTASKS"])
with open(os.environ["FAKE_SRUN_LOG"], "w") as log:
    log.write(" ".join(sys.argv[1:]))
procs = [
    subprocess.Popen(args, env={{**os.environ, "SLURM_PROCID": str(i),
        "SLURM_STEP_NUM_TASKS": str(n), "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"]}})
    for i in range(n)
]
# Like srun, any task that fails (a non-zero code or a signal) fails the step.
sys.exit(1 if any(p.wait() != 0 for p in procs) else 0)
"""

# Each process writes its own report file: processes sharing one stdout pipe can interleave
# their lines (the [Gloo] logs and an unbuffered print's payload and newline are separate writes).
PROBE = """
import json, os, jax, numpy as np
from jax.experimental import multihost_utils
from train import distributed
from train.config import DistributedConfig
from omegaconf import OmegaConf
assert distributed.maybe_initialize(OmegaConf.structured(DistributedConfig))
total = multihost_utils.process_allgather(np.array([jax.process_index()]))
report = {"index": jax.process_index(), "count": jax.process_count(),
          "devices": jax.device_count(), "gathered": total.ravel().tolist()}
with open(os.path.join(os.environ["PROBE_REPORTS"], f"{jax.process_index()}.json"), "w") as f:
    json.dump(report, f)
"""


def test_slurm_script_starts_a_real_two_process_job(tmp_path):
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{srun.parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "SLURM_JOB_ID": "77",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "BLAYERS_COORDINATOR_PORT": str(port),
        "BLAYERS_CMD": f"{sys.executable} -c",
        "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
        "PROBE_REPORTS": str(tmp_path),
    }
    out = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("[0-9].json"))]
    assert reports == [{"index": i, "count": 2, "devices": 4, "gathered": [0, 1]} for i in range(2)]
    assert (tmp_path / "srun.log").read_text().startswith("--kill-on-bad-exit=1 --wait=300 ")


def test_slurm_script_directives_fit_together():
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert directives["signal"] == "TERM@180" and "requeue" in directives
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0


def _k8s(name):
    return {d["kind"]: d for d in yaml.safe_load_all((LAUNCH / "k8s" / name).read_text()) if d}


@pytest.mark.parametrize(
    ("name", "accelerator"),
    [
        ("train-gpu.yaml", "nvidia.com/gpu"),
        ("train-tpu.yaml", "google.com/tpu"),
    ],
)
def test_kubernetes_manifests_wire_pods_to_the_coordinator(name, accelerator):
    docs = _k8s(name)
    service, job = docs["Service"], docs["Job"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    assert pod["subdomain"] == service["metadata"]["name"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # what Kubernetes adds in pod 1 of the Indexed Job
    placement = distributed.resolve_placement(cfg(), {**env, "JOB_COMPLETION_INDEX": "1"})
    port = service["spec"]["ports"][0]["port"]
    assert placement.coordinator == (
        f"{job['metadata']['name']}-0.{service['metadata']['name']}:{port}"
    )
    assert placement.num_processes == spec["completions"] and placement.process_id == 1
    assert accelerator in container["resources"]["limits"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["runs"] == "/runs" and "persistentVolumeClaim" in volumes["runs"]
    run_dir = next(a for a in container["args"] if a.startswith("run_dir="))
    assert run_dir.startswith("run_dir=/runs/")
    assert pod["terminationGracePeriodSeconds"] >= 60  # time to checkpoint on SIGTERM


def test_shared_run_volume_is_read_write_many():
    claim = _k8s("train-gpu.yaml")["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    tpu_claim = _k8s("train-tpu.yaml")["Job"]["spec"]["template"]["spec"]["volumes"][0]
    assert tpu_claim["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_pinned_versions_satisfy_the_declared_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    extras = project["optional-dependencies"]
    for spec in project["dependencies"] + extras["dev"] + extras["cuda"] + extras["tpu"]:
        req = Requirement(spec)
        assert req.name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[req.name]), f"{req.name}=={pins[req.name]} vs {req}"
    dockerfile = (REPO / "Dockerfile").read_text()
    for target in ("runtime", "tpu", "test"):
        assert re.search(rf"^FROM \S+ AS {target}$", dockerfile, re.M)
    assert dockerfile.count("-c constraints.txt") == 2


def _tpu(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TPU_NAME": "slice", "ZONE": "us-central2-b", "DRY_RUN": "1"}
    return subprocess.run(
        ["bash", str(LAUNCH / "tpu.sh"), *args], env=env, capture_output=True, text=True
    )


def test_tpu_recipe_starts_one_process_per_host_with_the_users_overrides():
    out = _tpu("train", "run_dir=/mnt/runs/exp 1", "optim.lr=0.01")
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert "--worker=all" in argv
    remote = shlex.split(argv[argv.index("--command") + 1])
    start = remote.index(".venv/bin/blayers-train")
    assert remote[start + 1 : start + 4] == [
        "distributed.enabled=true",
        "run_dir=/mnt/runs/exp 1",
        "optim.lr=0.01",
    ]
    stop = shlex.split(_tpu("stop").stdout)
    assert "pkill -TERM" in stop[stop.index("--command") + 1]
    assert _tpu("bogus").returncode == 2
    missing = subprocess.run(
        ["bash", str(LAUNCH / "tpu.sh"), "train"],
        capture_output=True,
        text=True,
        env={**os.environ, "TPU_NAME": ""},
    )
    assert missing.returncode != 0 and "TPU_NAME" in missing.stderr
