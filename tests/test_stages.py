"""Wall time by stage (train.stages): a training run records where its seconds went in
run.json and its log, a resumed one restores instead of initializing, and scoring logs its
own stages."""

from __future__ import annotations

import json
import time

import pytest

from tests.service_helpers import score_cfg, small_config, small_dataset
from train import loop
from train import score as score_lib
from train.stages import StageClock

FRESH = ["start-up", "data", "setup", "init", "first step", "steps", "final checkpoint"]


def test_a_stage_marked_twice_adds_up() -> None:
    clock = StageClock(since=time.perf_counter())
    time.sleep(0.01)
    first = clock.mark("a")
    time.sleep(0.01)
    clock.mark("b")
    time.sleep(0.01)
    again = clock.mark("a")
    assert list(clock.record()) == ["a", "b"]
    assert clock.seconds["a"] == pytest.approx(first + again)
    assert min(first, again, clock.seconds["b"]) >= 0.01
    assert clock.line().startswith("stages: a 0.0 s, b 0.0 s (total 0.0")


def test_a_run_records_its_stages_and_a_resume_restores(tmp_path) -> None:
    data = small_dataset(tmp_path)
    run = tmp_path / "run"
    lines: list[str] = []
    started = time.perf_counter()
    result = loop.train(small_config(data, run), log=lines.append)
    wall = time.perf_counter() - started
    stages = result["stages"]
    assert list(stages) == FRESH
    assert all(s >= 0 for s in stages.values())
    # everything after start-up happened inside this call, and adds up to it
    assert sum(v for k, v in stages.items() if k != "start-up") == pytest.approx(wall, abs=0.5)
    assert json.loads((run / "run.json").read_text())["stages"] == stages
    assert any(line.startswith("stages: start-up ") for line in lines)

    resumed = loop.train(small_config(data, run, **{"train.steps": 30}), log=lines.append)
    assert "restore" in resumed["stages"] and "init" not in resumed["stages"]

    lines.clear()
    manifest = score_lib.score(score_cfg(run, data, tmp_path / "scores"), log=lines.append)
    assert list(manifest["stages"]) == ["start-up", "restore", "prepare", "scoring", "manifest"]
    assert any(line.startswith("stages: start-up ") for line in lines)
