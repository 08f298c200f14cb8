"""The command lines' Hydra conventions (train/cli.py): a multirun job per run directory,
the resolved config beside the run, groups in --help, nothing written where it is run."""

from __future__ import annotations

import json

import yaml

from tests.service_helpers import run_cli, small_dataset
from train.cli import sweep_job_dir


def test_a_sweep_job_is_named_by_the_values_it_takes_of_the_swept_keys():
    argv = ["-m", "run_dir=/r", "optim.lr=0.01,0.05", "train.steps=5", "model=embeddings"]
    job = ["run_dir=/r", "optim.lr=0.05", "train.steps=5", "model=embeddings"]
    assert sweep_job_dir("/r", job, argv) == "/r/optim.lr=0.05"
    argv = ["-m", "optim=adam,adagrad", "data.path=a/b.parquet,c/d.parquet"]
    job = ["optim=adagrad", "data.path=c/d.parquet"]
    assert sweep_job_dir("/r", job, argv) == "/r/optim=adagrad,data.path=c_d.parquet"
    assert sweep_job_dir("/r", ["train.steps=5"], ["-m", "train.steps=5"]) == "/r/job"


def test_multirun_trains_each_job_in_its_own_run_dir_and_writes_nothing_where_it_runs(tmp_path):
    data = small_dataset(tmp_path / "data")
    here = tmp_path / "cwd"
    here.mkdir()
    args = [
        "-m",
        f"run_dir={tmp_path / 'sweep'}",
        f"data.path={data}",
        "data.batch_size=256",
        "train.steps=6",
        "train.log_every=3",
        "train.progress=false",
        "checkpoint.every=6",
        "optim.lr=0.01,0.02",
    ]
    proc = run_cli("train", *args, cwd=here, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(here.iterdir()) == []
    for lr in ("0.01", "0.02"):
        run = tmp_path / "sweep" / f"optim.lr={lr}"
        assert (run / "checkpoints" / "6").is_dir(), sorted(p.name for p in run.iterdir())
        resolved = yaml.safe_load((run / "config.yaml").read_text())
        assert resolved["optim"]["lr"] == float(lr)
        assert resolved["run_dir"] == str(run)
        saved = json.loads((run / "run.json").read_text())
        assert saved["step"] == 6


def test_help_names_the_tool_and_lists_the_config_groups():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("blayers-train is powered by Hydra")
    for group in ("data:", "mesh:", "model:", "optim:", "sharding:"):
        assert group in proc.stdout
