"""The run directory: one trainer at a time (a lock a crash cannot leave stale), a vocabulary
that appears whole or not at all, and column names that never become paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import REPO, refusal, run_cli, small_config, small_dataset
from train import loop, rundir
from train import vocab as vocab_lib
from train.data import DataError

ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _hold_lock(run_dir) -> subprocess.Popen:
    """A process that takes ``run_dir``'s lock and sleeps; returns once it holds it."""
    code = textwrap.dedent(
        f"""
        import time
        from train.rundir import locked
        with locked({str(run_dir)!r}):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_is_refused_in_one_line_and_a_killed_holder_leaves_no_stale_lock(
    tmp_path,
):
    data = small_dataset(tmp_path / "data")
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        args = [
            f"run_dir={run}",
            f"data.path={data}",
            "data.numeric=[x1,x2,x3,x4]",
            "data.categorical=[user,item,region]",
            "data.batch_size=64",
            "train.steps=10",
            "train.progress=false",
        ]
        line = refusal(run_cli("train", *args))
        assert f"in use by PID {holder.pid} on host" in line, line
        assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK_NAME]  # nothing written
        with pytest.raises(rundir.RunDirBusyError, match=f"PID {holder.pid}"):
            loop.train(small_config(data, run), log=lambda _: None)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # the kernel dropped the dead holder's lock: the run trains
    assert (
        loop.train(small_config(data, run, **{"train.steps": 10}), log=lambda _: None)["step"] == 10
    )


def test_a_vocabulary_write_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    vocabs = {
        c: vocab_lib.Vocab(c, pa.array(["a", "b"]), pa.array([3, 1]).to_numpy())
        for c in ("user", "item")
    }
    written = []

    def write_then_fail(self, path):
        if written:
            raise OSError(28, "No space left on device")
        written.append(self.column)
        pq.write_table(pa.table({"value": self.values, "count": self.counts}), path)

    monkeypatch.setattr(vocab_lib.Vocab, "write", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        vocab_lib.save_all(vocabs, tmp_path / "vocab")
    assert written == ["user"]
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a hidden temporary


def _partial_vocab(run) -> None:
    """What a kill between per-column writes left under the earlier layout: one column."""
    vocab = run / "vocab"
    saved = vocab_lib.load_all(vocab, ["user"])["user"]
    for p in vocab.iterdir():
        p.unlink()
    saved.write(vocab / "user.parquet")


def test_a_partial_vocabulary_from_a_start_that_saved_no_step_is_rebuilt(tmp_path):
    data = small_dataset(tmp_path / "data")
    run = tmp_path / "run"
    loop.train(small_config(data, run, dry_run=True), log=lambda _: None)  # vocab, no steps
    whole = vocab_lib.load_all(run / "vocab", ["user", "item", "region"])
    _partial_vocab(run)
    with pytest.raises(vocab_lib.IncompleteVocabError, match="'item'"):
        vocab_lib.load_all(run / "vocab", ["user", "item", "region"])
    assert loop.train(small_config(data, run), log=lambda _: None)["step"] == 20
    rebuilt = vocab_lib.load_all(run / "vocab", ["user", "item", "region"])
    for c, v in whole.items():
        assert rebuilt[c].values.equals(v.values) and (rebuilt[c].counts == v.counts).all()


def test_an_incomplete_vocabulary_under_saved_steps_is_refused_naming_it(tmp_path):
    data = small_dataset(tmp_path / "data")
    run = tmp_path / "run"
    loop.train(small_config(data, run), log=lambda _: None)
    _partial_vocab(run)
    with pytest.raises(DataError, match=r"no vocabulary for column 'item'.*holds steps"):
        loop.train(small_config(data, run, **{"train.steps": 30}), log=lambda _: None)
    assert (run / "vocab" / "user.parquet").exists()  # the run's own files left as they were


def test_a_column_name_never_becomes_a_path(tmp_path):
    data = small_dataset(tmp_path / "data")
    table = pq.read_table(data).rename_columns(
        ["../../escaped" if n == "region" else n for n in pq.read_schema(data).names]
    )
    hostile = tmp_path / "hostile.parquet"
    pq.write_table(table, hostile)
    run = tmp_path / "deep" / "run"
    cfg = small_config(
        hostile,
        run,
        **{
            "data.categorical": ["user", "item", "../../escaped"],
            "model.terms": [
                {"layer": "InterceptLayer", "name": "bias"},
                {"layer": "RandomEffectsLayer", "name": "place", "inputs": ["../../escaped"]},
            ],
        },
    )
    assert loop.train(cfg, log=lambda _: None)["step"] == 20
    assert not list(tmp_path.rglob("escaped*"))
    assert vocab_lib.load_all(run / "vocab", ["../../escaped"])["../../escaped"].size == 100


def test_a_planted_link_at_an_output_path_is_replaced_never_written_through(tmp_path):
    from train import files
    from train.summary import write_csv

    victim = tmp_path / "elsewhere.txt"
    victim.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("summary.csv", "report.html", "run.json"):
        (run / name).symlink_to(victim)
    write_csv([], run / "summary.csv")
    files.write_text(run / "report.html", "<html></html>")
    files.write_text(run / "run.json", "{}")
    assert victim.read_text() == "keep me"
    assert all(files.is_regular_file(run / n) for n in ("summary.csv", "report.html", "run.json"))
    assert sorted(p.name for p in run.iterdir()) == ["report.html", "run.json", "summary.csv"]
