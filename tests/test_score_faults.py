"""Scores that match their checkpoint: a part is reused only when it was made from the same
checkpoint, input, draws and quantiles; a planted link is never served; output columns never
collide with input columns or with each other; bad score settings are refused before work."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import score_cfg, small_config, small_dataset
from train import loop
from train import score as score_lib
from train.config import ConfigError
from train.data import DataError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("provenance")
    data = small_dataset(base, rows=2000)
    pq.write_table(pq.read_table(data), base / "multi.parquet", row_group_size=700)
    loop.train(small_config(data, base / "run", **{"train.steps": 20}), log=lambda _: None)
    return base


def _skipped(out) -> list[int]:
    manifest = json.loads((out / "_manifest.json").read_text())
    return [p["part"] for p in manifest["parts"] if p["skipped"]]


def _made_from(part) -> dict:
    return json.loads(pq.read_schema(part).metadata[score_lib.PROVENANCE.encode()])


def test_parts_are_redone_after_more_training_and_for_other_draws(run, tmp_path):
    out = tmp_path / "scores"
    cfg = score_cfg(run / "run", run / "multi.parquet", out)
    score_lib.score(cfg, log=lambda _: None)
    before = pq.read_table(out)["mean"].to_numpy()
    assert _made_from(out / "part-00000.parquet")["checkpoint_step"] == 20
    score_lib.score(cfg, log=lambda _: None)
    assert _skipped(out) == [0, 1, 2]  # same checkpoint, same input: reused

    data = small_dataset(run, rows=2000)
    loop.train(small_config(data, run / "run", **{"train.steps": 40}), log=lambda _: None)
    score_lib.score(cfg, log=lambda _: None)
    assert _skipped(out) == []  # a newer checkpoint: every part redone
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["checkpoint_step"] == 40
    assert {_made_from(p)["checkpoint_step"] for p in out.glob("part-*.parquet")} == {40}
    assert not np.allclose(pq.read_table(out)["mean"].to_numpy(), before)

    score_lib.score(score_cfg(run / "run", run / "multi.parquet", out, draws=20), log=print)
    assert _skipped(out) == []  # other draws: redone
    assert {_made_from(p)["draws"] for p in out.glob("part-*.parquet")} == {20}


def test_parts_made_under_another_draw_scheme_are_redone(run, tmp_path, monkeypatch):
    """An output never mixes two random streams: parts written when draws were made another
    way (an older version) are redone, not reused beside new ones."""
    from train import posterior

    out = tmp_path / "scores"
    cfg = score_cfg(run / "run", run / "multi.parquet", out)
    monkeypatch.setattr(posterior, "DRAW_SCHEME", 1)
    score_lib.score(cfg, log=lambda _: None)
    assert {_made_from(p)["draw_scheme"] for p in out.glob("part-*.parquet")} == {1}
    monkeypatch.undo()
    score_lib.score(cfg, log=lambda _: None)
    assert _skipped(out) == []
    schemes = {_made_from(p)["draw_scheme"] for p in out.glob("part-*.parquet")}
    assert schemes == {posterior.DRAW_SCHEME} != {1}


def test_a_planted_link_is_never_served_as_a_part(run, tmp_path):
    out = tmp_path / "scores"
    cfg = score_cfg(run / "run", run / "multi.parquet", out)
    score_lib.score(cfg, log=lambda _: None)
    forged = tmp_path / "forged.parquet"
    table = pq.read_table(out / "part-00001.parquet")
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), forged)
    (out / "part-00001.parquet").unlink()
    (out / "part-00001.parquet").symlink_to(forged)
    score_lib.score(cfg, log=lambda _: None)
    assert _skipped(out) == [0, 2]
    assert not (out / "part-00001.parquet").is_symlink()  # replaced, not written through
    assert pq.read_table(forged).equals(table)


def test_an_input_column_named_like_a_score_column_is_refused(run, tmp_path):
    table = pq.read_table(run / "multi.parquet")
    data = tmp_path / "with_mean.parquet"
    pq.write_table(table.append_column("mean", table["x1"]), data)
    out = tmp_path / "scores"
    with pytest.raises(DataError, match=r"\['mean'\].*passthrough"):
        score_lib.score(score_cfg(run / "run", data, out), log=lambda _: None)
    assert not out.exists()
    passthrough = ["row_id"]  # leaving it out is the fix
    score_lib.score(score_cfg(run / "run", data, out, passthrough=passthrough), print)
    assert pq.read_schema(out / "part-00000.parquet").names.count("mean") == 1


def test_quantile_names_are_unique_at_any_precision(run, tmp_path):
    out = tmp_path / "scores"
    cfg = score_cfg(run / "run", run / "multi.parquet", out, quantiles=[0.5, 0.001, 0.004])
    score_lib.score(cfg, log=lambda _: None)
    names = pq.read_schema(out / "part-00000.parquet").names
    assert [n for n in names if n.startswith("q")] == ["q001", "q004", "q50"]
    table = pq.read_table(out)
    assert np.all(table["q001"].to_numpy() <= table["q004"].to_numpy() + 1e-7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.batch_size": -4}, "data.batch_size=-4"),
        ({"draws": 0}, "draws=0"),
        ({"quantiles": [0.5, 0.5]}, "repeats"),
        ({"quantiles": [1.5]}, r"must lie in \[0, 1\]"),
        ({"predraw_mb": -1}, "predraw_mb=-1"),
    ],
)
def test_bad_score_settings_are_refused_before_any_work(run, tmp_path, overrides, message):
    out = tmp_path / "scores"
    with pytest.raises(ConfigError, match=message):
        score_lib.score(score_cfg(run / "run", run / "multi.parquet", out, **overrides), print)
    assert not out.exists()


def test_an_output_path_that_is_a_file_is_refused(run, tmp_path):
    out = tmp_path / "scores"
    out.write_text("not a directory")
    with pytest.raises(DataError, match="is a file"):
        score_lib.score(score_cfg(run / "run", run / "multi.parquet", out), log=lambda _: None)
    assert out.read_text() == "not a directory"


def test_a_full_disk_mid_score_loses_nothing_and_the_rerun_matches(run, tmp_path, monkeypatch):
    import errno

    from train import files

    real = files.atomic_write

    def disk_full(path, write):
        if path.name == "part-00001.parquet":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    out, ref = tmp_path / "scores", tmp_path / "ref"
    monkeypatch.setattr(files, "atomic_write", disk_full)
    with pytest.raises(OSError, match="No space"):
        score_lib.score(score_cfg(run / "run", run / "multi.parquet", out), log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]  # nothing partial
    monkeypatch.undo()
    score_lib.score(score_cfg(run / "run", run / "multi.parquet", out), log=lambda _: None)
    assert _skipped(out) == [0]  # the part written before the fault is kept
    score_lib.score(score_cfg(run / "run", run / "multi.parquet", ref), log=lambda _: None)
    assert pq.read_table(out).equals(pq.read_table(ref))
