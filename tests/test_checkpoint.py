"""Checkpoints that are corrupt, unreadable or superseded: every array's checksum is saved and
verified; a bad latest step is named in one line and restore falls back to the newest good one
(or fails, when strict); ``train.resume_step`` resumes from an earlier step; and a run that
fell back finishes bit-for-bit equal to an undisturbed one."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.service_helpers import load_params, refusal, run_cli, small_config, small_dataset
from train import checkpoint as ckpt
from train import loop
from train.config import ConfigError
from train.run import restore_run

SETTINGS = {"train.steps": 30, "checkpoint.every": 10, "train.log_every": 1000}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The data, and undisturbed runs that stopped at step 10 or 20 of 30 and then went on to
    40: what a run that resumes from step 10 or 20 must equal (the schedule spans the total
    steps, so it is not a 40-step run from the start)."""
    base = tmp_path_factory.mktemp("ckpt_faults")
    data = small_dataset(base / "data")
    for stop in (10, 20):
        ref = base / f"ref{stop}"
        loop.train(small_config(data, ref, **{**SETTINGS, "train.stop_after": stop}), print)
        loop.train(small_config(data, ref, **{**SETTINGS, "train.steps": 40}), print)
    loop.train(small_config(data, base / "trained", **SETTINGS), log=lambda _: None)
    return base, data


def _trained(runs, tmp_path) -> Path:
    """A copy of one 30-step run (checkpoints 10, 20, 30) for a test to damage."""
    base, _ = runs
    run = tmp_path / "run"
    shutil.copytree(base / "trained", run, symlinks=True)
    assert ckpt.steps(run / "checkpoints") == [30, 20, 10]
    return run


def _flip(path: Path, offset_fraction: float = 0.5, width: int = 16) -> None:
    raw = bytearray(path.read_bytes())
    at = int(len(raw) * offset_fraction)
    raw[at : at + width] = bytes(b ^ 0xFF for b in raw[at : at + width])
    path.write_bytes(bytes(raw))


def _array_files(step_dir: Path) -> list[Path]:
    """The files holding a step's array data (TensorStore's chunks), largest first."""
    found = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return sorted(found, key=lambda p: -p.stat().st_size)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _reference_checksum(x: np.ndarray) -> int:
    """The checksum's definition, element by element in Python integers."""
    flat = x.reshape(-1)
    if flat.dtype.itemsize == 4:
        bits = [int(b) for b in flat.view(np.uint32)]
    else:  # XLA's convert: integers wrap to 32 bits, bools are 0/1
        bits = [int(b) % 2**32 for b in flat.astype(np.int64)]
    golden = int(ckpt._GOLDEN)
    return sum(b * ((2 * i + 1) * golden % 2**32) for i, b in enumerate(bits)) % 2**32


def test_checksums_equal_their_definition_on_the_host_and_on_sharded_devices():
    rng = np.random.default_rng(3)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    host = {
        "f32": rng.normal(size=(16, 3, 2)).astype(np.float32),
        "i32": rng.integers(-(2**31), 2**31 - 1, 24, dtype=np.int64).astype(np.int32),
        "u32": rng.integers(0, 2**32, (8, 5), dtype=np.uint64).astype(np.uint32),
        "i8": rng.integers(-128, 128, (8, 3)).astype(np.int8),
        "bool": rng.random(16) < 0.5,
        "scalar": np.float32(-0.75),
        "nan": np.array([np.nan, -0.0, np.inf, 1e-45], np.float32),
    }
    state = {
        k: jax.device_put(v, sharded)
        if np.ndim(v) and v.shape[0] % 8 == 0
        else jax.numpy.asarray(v)
        for k, v in host.items()
    }
    expected = {f"['{k}']": _reference_checksum(np.asarray(v)) for k, v in host.items()}
    assert ckpt.state_checksums(state) == expected  # every leaf summed on the host
    assert ckpt.state_checksums(state, host_max=-1) == expected  # every leaf on the devices
    mixed = ckpt.state_checksums(state, host_max=20)  # some of each, in one call
    assert mixed == expected


def test_a_changed_array_fails_its_checksum(runs, tmp_path):
    run = _trained(runs, tmp_path)
    _, state, meta = restore_run(run)
    ckpt.verify(state, meta, 30, run)  # intact
    leaf = state.params["InterceptLayer_bias_beta"]["loc"]
    changed = state._replace(
        params={
            **state.params,
            "InterceptLayer_bias_beta": {
                **state.params["InterceptLayer_bias_beta"],
                "loc": leaf.at[0].set(jax.numpy.nextafter(leaf[0], np.inf)),  # one ulp
            },
        }
    )
    with pytest.raises(
        ckpt.CheckpointError, match=r"step 30 .* corrupt: .*InterceptLayer_bias_beta"
    ):
        ckpt.verify(changed, meta, 30, run)


def test_a_corrupt_latest_step_is_named_and_restore_falls_back(runs, tmp_path):
    run = _trained(runs, tmp_path)
    expected = load_params(run, 20)
    for f in _array_files(run / "checkpoints" / "30"):
        _flip(f)
    said = []
    _, _state, meta = restore_run(run, log=said.append)
    assert meta["step"] == 20
    assert any("step 30" in line and "falling back to step 20" in line for line in said), said
    assert all("\n" not in line for line in said)
    assert _same(load_params(run, 20), expected)
    with pytest.raises(ckpt.CheckpointError, match="step 30"):
        restore_run(run, strict=True, log=lambda _: None)
    with pytest.raises(ckpt.CheckpointError, match="step 30"):
        restore_run(run, step=30, log=lambda _: None)  # a step asked for by name: no fallback


def test_unreadable_metadata_is_passed_over(runs, tmp_path):
    run = _trained(runs, tmp_path)
    meta_file = next((run / "checkpoints" / "30" / "meta").rglob("*.json"), None) or next(
        p for p in (run / "checkpoints" / "30" / "meta").rglob("*") if p.is_file()
    )
    meta_file.write_text("{not json")
    said = []
    _, _, meta = restore_run(run, log=said.append)
    assert meta["step"] == 20 and any("step 30" in line for line in said)


def test_a_run_that_fell_back_finishes_equal_to_an_undisturbed_one(runs, tmp_path):
    base, data = runs
    run = _trained(runs, tmp_path)
    for f in _array_files(run / "checkpoints" / "30"):
        _flip(f)
    said = []
    result = loop.train(small_config(data, run, **{**SETTINGS, "train.steps": 40}), said.append)
    assert result["step"] == 40
    assert any("resumed from step 20" in line for line in said), said
    assert (run / "set_aside").is_dir() and len(list((run / "set_aside").iterdir())) == 1
    assert _same(load_params(run), load_params(base / "ref20"))
    _, _state, meta = restore_run(run, step=30, log=lambda _: None)  # saved anew, verified
    assert meta["step"] == 30


def test_resume_step_continues_from_an_earlier_step(runs, tmp_path):
    base, data = runs
    run = _trained(runs, tmp_path)
    said = []
    cfg = small_config(data, run, **{**SETTINGS, "train.steps": 40, "train.resume_step": 10})
    assert loop.train(cfg, said.append)["step"] == 40
    assert any("resumed from step 10" in line for line in said), said
    assert len(list((run / "set_aside").iterdir())) == 2  # steps 20 and 30, kept
    assert _same(load_params(run), load_params(base / "ref10"))
    with pytest.raises(ConfigError, match=r"train\.resume_step=15"):
        loop.train(small_config(data, run, **{**SETTINGS, "train.resume_step": 15}), lambda _: None)


def test_a_corrupt_checkpoint_on_the_command_line_is_one_line(runs, tmp_path):
    _base, data = runs
    run = _trained(runs, tmp_path)
    for f in _array_files(run / "checkpoints" / "30"):
        _flip(f)
    args = [f"run_dir={run}", f"data.path={data}", f"output={tmp_path / 'scores'}", "draws=4"]
    assert "checkpoint step 30" in refusal(run_cli("score", *args, "strict=true"))
    assert not (tmp_path / "scores").exists()
    fallback = run_cli("score", *args)
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert fallback.stderr.strip() == "", fallback.stderr[-3000:]  # no late tracebacks
    warned = [line for line in fallback.stdout.splitlines() if "step 30" in line]
    assert len(warned) == 1 and "falling back to step 20" in warned[0], fallback.stdout


def test_a_model_function_planted_in_checkpoint_metadata_is_never_imported(
    runs, tmp_path, monkeypatch
):
    """Metadata is only as trustworthy as whoever could write the run dir: a ``_target_``
    planted there is refused, naming ``trust_model``, before anything imports it."""
    import json

    run = _trained(runs, tmp_path)
    planted = tmp_path / "planted"
    planted.mkdir()
    sentinel = tmp_path / "imported"
    (planted / "planted_model.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()\ndef fn(*a, **k):\n    raise SystemExit\n"
    )
    monkeypatch.syspath_prepend(str(planted))
    for step in (10, 20, 30):
        meta_file = run / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        inner = meta.get("meta", meta)
        inner["config"]["model"]["_target_"] = "planted_model.fn"
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"trust_model.*planted_model\.fn"):
        restore_run(run, log=lambda _: None)
    assert not sentinel.exists()
    said = refusal(run_cli("summary", f"run_dir={run}"))
    assert "trust_model=planted_model.fn" in said and not sentinel.exists()
