"""2 processes x 4 fake CPU devices over loopback (jax.distributed), against 1 x 8."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose

from launch.local import launch
from tests.service_helpers import REPO, load_params, small_config, small_dataset
from train import loop


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("mp"), rows=3000)


def _launch(*args: str, timeout: float = 400, grace: float = 20) -> int:
    env_before = dict(os.environ)
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        return launch(
            [sys.executable, "-m", "tests.mp_worker", *map(str, args)],
            processes=2,
            cpu_devices=4,
            grace=grace,
            timeout=timeout,
        )
    finally:
        os.environ.clear()
        os.environ.update(env_before)


def test_two_processes_train_like_one_and_resume_in_one(dataset, tmp_path):
    assert _launch("train", dataset, tmp_path / "mp") == 0
    one = small_config(dataset, tmp_path / "single", **{"mesh.data": 2, "mesh.model": 4})
    loop.train(one, log=lambda _: None)
    a, b = load_params(tmp_path / "mp"), load_params(tmp_path / "single")
    assert a.keys() == b.keys()
    for k in a:
        assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
    # the 2-process checkpoint resumes in this single process and continues
    more = small_config(
        dataset, tmp_path / "mp", **{"mesh.data": 2, "mesh.model": 4, "train.steps": 30}
    )
    messages = []
    assert loop.train(more, log=messages.append)["step"] == 30
    assert any("resumed from step 20" in m for m in messages)
    assert jax.process_count() == 1


def test_two_processes_score_every_row_exactly_once(dataset, tmp_path):
    loop.train(small_config(dataset, tmp_path / "run"), log=lambda _: None)
    multi = tmp_path / "multi.parquet"
    pq.write_table(pq.read_table(dataset), multi, row_group_size=500)  # 6 parts
    assert _launch("score", multi, tmp_path / "run", tmp_path / "scores") == 0
    manifest = json.loads((tmp_path / "scores" / "_manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["num_parts"] == 6
    per_process = [
        json.loads((tmp_path / "scores" / f"_manifest-0000{i}.json").read_text()) for i in range(2)
    ]
    assert [sorted(p["part"] for p in m["parts"]) for m in per_process] == [[0, 2, 4], [1, 3, 5]]
    table = pq.read_table(tmp_path / "scores").sort_by("row_id")
    assert table["row_id"].to_pylist() == list(range(3000))
    assert np.isfinite(table["mean"].to_numpy()).all()
    # tables drawn batch by batch, each process drawing the rows of its batches: the same
    # draws of every row, so the same scores
    out = tmp_path / "scores-per-batch"
    assert _launch("score", multi, tmp_path / "run", out, "predraw_mb=0") == 0
    per_batch = pq.read_table(out).sort_by("row_id")
    for column in ("mean", "std", "q05", "q95"):
        assert_allclose(
            per_batch[column].to_numpy(), table[column].to_numpy(), rtol=1e-5, atol=1e-6
        )


def test_a_dead_process_fails_the_job_in_bounded_time(tmp_path):
    code = (
        "import os, sys, time\n"
        "sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(600)\n"
    )
    assert launch([sys.executable, "-c", code], processes=2, grace=2, timeout=60) == 3


def test_a_killed_process_ends_the_job_and_the_rerun_resumes_exactly(dataset, tmp_path, capfd):
    run = tmp_path / "mp"
    # process 1 is SIGKILLed on reaching step 30; the launcher would wait 10 minutes, so the
    # job ending before its 300 s timeout (status 124) is JAX's heartbeat bound at work
    status = _launch(
        "die-at",
        30,
        dataset,
        run,
        "train.steps=40",
        "distributed.heartbeat_timeout_s=10",
        grace=600,
        timeout=300,
    )
    assert status == -9
    output = capfd.readouterr()
    assert "process 1 was killed by SIGKILL" in output.err
    # the survivor says what happened and what to do
    assert "training stopped on process 0 of 2" in output.out
    assert "resume from the last complete checkpoint" in output.out
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        10,
        20,
    ]
    assert _launch("train", dataset, run, "train.steps=40") == 0
    assert "[0] resumed from step 20" in capfd.readouterr().out
    reference = small_config(
        dataset, tmp_path / "single", **{"mesh.data": 2, "mesh.model": 4, "train.steps": 40}
    )
    loop.train(reference, log=lambda _: None)
    a, b = load_params(run), load_params(tmp_path / "single")
    for k in a:
        assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)
