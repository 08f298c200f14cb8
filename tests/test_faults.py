"""Injected faults: a run that diverges never checkpoints a non-finite state, stops with
one line naming the step and the site, and a rerun with the cause fixed resumes from the last
good step and finishes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.service_helpers import load_params, refusal, run_cli, small_config, small_dataset
from train import loop
from train.checkpoint import Checkpointer
from train.state import NonFiniteError


def _steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_a_diverging_run_never_saves_a_non_finite_state_and_a_fixed_rerun_resumes(tmp_path):
    data = small_dataset(tmp_path / "data")
    settings = {"train.steps": 40, "checkpoint.every": 10, "train.log_every": 1000}
    loop.train(small_config(data, tmp_path / "run", **settings), log=lambda _: None)
    assert _steps(tmp_path / "run") == [20, 30, 40]  # max_to_keep 3
    diverging = {
        **settings,
        "train.steps": 80,
        "optim.lr": 1e6,
        "optim.schedule": "constant",
        "train.resume": "force",  # the fault: resumed under a learning rate that diverges
    }
    with pytest.raises(NonFiniteError, match=r"not finite at step \d+ \(first: .+\).*step 40"):
        loop.train(small_config(data, tmp_path / "run", **diverging), log=lambda _: None)
    assert _steps(tmp_path / "run") == [20, 30, 40]  # nothing saved past the last finite step
    fixed = {**settings, "train.steps": 80}
    result = loop.train(small_config(data, tmp_path / "run", **fixed), log=lambda _: None)
    assert result["step"] == 80
    assert all(np.all(np.isfinite(v)) for v in load_params(tmp_path / "run").values())


def test_divergence_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    data = small_dataset(tmp_path / "data")
    args = [
        f"run_dir={tmp_path / 'run'}",
        f"data.path={data}",
        "data.numeric=[x1,x2,x3,x4]",
        "data.categorical=[user,item,region]",
        "data.batch_size=256",
        "train.steps=30",
        "train.log_every=10",
        "train.progress=false",
        "checkpoint.every=10",
        "optim.lr=1e6",
        "optim.schedule=constant",
    ]
    assert "optim.lr" in refusal(run_cli("train", *args))
    assert Checkpointer(tmp_path / "run" / "checkpoints").latest_step() is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.steps", -5),
        ("train.log_every", 0),
        ("checkpoint.every", 0),
        ("checkpoint.max_to_keep", 0),
        ("optim.lr", -0.01),
        ("optim.name", "adamm"),
        ("optim.schedule", "linear"),
        ("optim.end_lr_factor", 2.0),
        ("data.shuffle_block", 0),
    ],
)
def test_bad_settings_are_refused_before_any_data_is_read(tmp_path, key, value):
    from train.config import ConfigError

    data = small_dataset(tmp_path / "data")
    cfg = small_config(data, tmp_path / "run", **{key: value})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        loop.train(cfg, log=lambda _: None)
    assert not (tmp_path / "run").exists()  # refused before the data pass wrote anything


def test_a_changed_setting_on_an_existing_run_is_refused_naming_it(tmp_path):
    from train.config import ConfigError

    data = small_dataset(tmp_path / "data")
    run = tmp_path / "run"
    loop.train(small_config(data, run, **{"train.steps": 20}), log=lambda _: None)
    changed = {"train.steps": 30, "optim.lr": 0.05, "train.seed": 3}
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.01 → 0\.05; train\.seed: 0 → 3"):
        loop.train(small_config(data, run, **changed), log=lambda _: None)
    assert _steps(run) == [10, 20]  # untouched
    more = small_config(data, run, **{"train.steps": 30, "train.log_every": 7})  # safe changes
    assert loop.train(more, log=lambda _: None)["step"] == 30
    forced = small_config(data, run, **{**changed, "train.steps": 40, "train.resume": "force"})
    assert loop.train(forced, log=lambda _: None)["step"] == 40


def test_a_full_disk_mid_prepare_loses_nothing_and_the_rerun_matches(tmp_path, monkeypatch):
    import errno

    from train import files

    data = small_dataset(tmp_path / "data")
    real = files.atomic_write

    def disk_full(path, write):
        if path.name == "train.arrow":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(files, "atomic_write", disk_full)
    with pytest.raises(OSError, match="No space"):
        loop.train(small_config(data, tmp_path / "run"), log=lambda _: None)
    left = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    assert left == ["data"], left  # no partial store, vocabulary or checkpoint
    monkeypatch.undo()
    loop.train(small_config(data, tmp_path / "run"), log=lambda _: None)
    loop.train(small_config(data, tmp_path / "ref"), log=lambda _: None)
    mine, ref = load_params(tmp_path / "run"), load_params(tmp_path / "ref")
    assert all(np.array_equal(mine[k], ref[k]) for k in ref)


def test_a_storage_error_on_the_command_line_is_one_line_naming_the_path(capsys, monkeypatch):
    import errno

    from train import cli, late_reads
    from train.config import Config

    # this process may have read a corrupt checkpoint in another test: exit normally here
    monkeypatch.setattr(late_reads, "restore_failed", lambda: False)

    def fails(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints")

    with pytest.raises(SystemExit) as exit_info:
        cli._friendly(fails, Config)(small_config("/nowhere", "/runs/x"))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "/runs/x/checkpoints: No space left on device" in lines[0]


def test_a_full_disk_at_a_checkpoint_loses_nothing_and_the_rerun_matches(tmp_path, monkeypatch):
    """ENOSPC while step 20 is being saved (a half-written temporary step left behind, as a
    save cut short leaves it): the run stops naming the path, the steps before stay good, and
    the rerun after freeing space equals an undisturbed run bit for bit."""
    import errno

    import orbax.checkpoint as ocp

    data = small_dataset(tmp_path / "data")
    settings = {"train.steps": 30, "checkpoint.every": 10, "train.log_every": 1000}
    real = ocp.CheckpointManager.save

    def disk_full(self, step, *args, **kwargs):
        if step == 20:
            partial = Path(self.directory) / "20.orbax-checkpoint-tmp-0"
            (partial / "state").mkdir(parents=True)
            (partial / "state" / "half").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(partial))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        loop.train(small_config(data, tmp_path / "run", **settings), log=lambda _: None)
    assert _steps(tmp_path / "run") == [10]
    monkeypatch.undo()
    assert loop.train(small_config(data, tmp_path / "run", **settings), print)["step"] == 30
    loop.train(small_config(data, tmp_path / "ref", **settings), log=lambda _: None)
    mine, ref = load_params(tmp_path / "run"), load_params(tmp_path / "ref")
    assert all(np.array_equal(mine[k], ref[k]) for k in ref)
