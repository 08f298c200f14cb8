"""train/files.py: every file the service writes appears whole or not at all, and a link
planted at its path is replaced, never written through."""

from __future__ import annotations

import os

import pytest

from train import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    files.write_text(path, "old")

    def torn(tmp):
        tmp.write_text("half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.atomic_write(path, torn)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_link_planted_at_the_destination_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("theirs")
    path = tmp_path / "summary.csv"
    path.symlink_to(victim)
    assert not files.is_regular_file(path)
    files.write_text(path, "ours")
    assert victim.read_text() == "theirs"
    assert files.is_regular_file(path) and path.read_text() == "ours"


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "part-00000.parquet"
    (tmp_path / ".part-00000.parquet.abc123.tmp").write_text("left by a kill")
    (tmp_path / ".part-00000.parquet.d9.tmp").mkdir()
    (tmp_path / ".part-00001.parquet.abc123.tmp").write_text("another path's: kept")
    files.write_text(path, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".part-00001.parquet.abc123.tmp",
        "part-00000.parquet",
    ]


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "vocab"
    with pytest.raises(RuntimeError), files.atomic_directory(target) as tmp:
        (tmp / "user.parquet").write_text("one of two")
        raise RuntimeError("killed half way")
    assert list(tmp_path.iterdir()) == []
    with files.atomic_directory(target) as tmp:
        (tmp / "user.parquet").write_text("1")
        (tmp / "item.parquet").write_text("2")
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["item.parquet", "user.parquet"]


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_text(tmp_path / "report.html", "<html/>")
    finally:
        os.umask(old)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o666 & ~files._UMASK
