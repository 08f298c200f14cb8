"""The persistent compilation cache the commands turn on (train.compile_cache): where it
goes, that a second identical command compiles nothing new and gives the same output, and
that a user's own JAX setting or ``off`` wins."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from tests.service_helpers import run_cli, small_config, small_dataset
from train import compile_cache, loop


def test_where_the_cache_goes(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "blayers" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.cache_dir() == tmp_path / "home" / ".cache" / "blayers" / "jax"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None


def test_a_cache_set_through_jax_itself_is_left_alone():
    # the suite's own (tests/conftest.py) is set through JAX_COMPILATION_CACHE_DIR
    before = jax.config.jax_compilation_cache_dir
    assert before
    assert compile_cache.enable(log=lambda _: None) is None
    assert jax.config.jax_compilation_cache_dir == before


def _entries(where: Path) -> set[str]:
    return {p.name for p in where.iterdir()} if where.is_dir() else set()


def test_a_second_summary_compiles_nothing_new_and_writes_the_same(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    run = tmp_path / "run"
    loop.train(small_config(data, run, **{"train.steps": 10}), log=lambda _: None)
    cache = tmp_path / "cache"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv(compile_cache.ENV, str(cache))
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    first = run_cli("summary", f"run_dir={run}", "draws=300")
    assert first.returncode == 0, first.stderr[-2000:]
    programs = sorted(p for p in _entries(cache) if p.endswith("-cache"))
    assert programs, "the first command wrote no compiled program"

    # the cache stamps each entry's last read in its "-atime" file
    def stamp(program: str) -> bytes:
        return (cache / program.replace("-cache", "-atime")).read_bytes()

    stamps = {p: stamp(p) for p in programs}
    summary = (run / "summary.csv").read_text()
    second = run_cli("summary", f"run_dir={run}", "draws=300")
    assert second.returncode == 0, second.stderr[-2000:]
    # every program the first command compiled, the second read from the cache (one that
    # compiled near the 0.2 s threshold may be added only now, under load: that is allowed)
    read = [p for p in programs if stamp(p) != stamps[p]]
    assert read == programs, sorted(set(programs) - set(read))
    assert (run / "summary.csv").read_text() == summary
