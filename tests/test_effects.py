"""Per-level effects (train.effects, blayers-effects): one row per category with its raw
value and training count, the guide's exact marginal, streamed in chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from tests.service_helpers import refusal, run_cli, small_config, small_dataset
from train import effects, loop
from train.run import restore_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("effects")
    data = small_dataset(tmp)
    cfg = small_config(data, tmp / "run")
    loop.train(cfg, log=lambda _: None)
    return data, Path(cfg.run_dir)


def read(run_dir: Path, term: str, chunk_rows: int = 1 << 18) -> pa.Table:
    setup, state, _ = restore_run(run_dir, log=lambda _: None)
    batches = effects.effect_batches(setup, state, run_dir / "vocab", term, chunk_rows=chunk_rows)
    return pa.Table.from_batches(list(batches))


def test_cli_writes_one_row_per_category_with_raw_values_and_counts(trained):
    data, run_dir = trained
    proc = run_cli("effects", f"run_dir={run_dir}", "term=user")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = pq.read_table(run_dir / "effects" / "user.parquet")
    raw = pq.read_table(data, columns=["user"])["user"]
    counts = pc.value_counts(raw).to_pylist()
    want = {c["values"]: c["counts"] for c in counts}
    assert got.num_rows == len(want)
    assert got["value"].type == raw.type  # the raw values, as in the data
    assert dict(zip(got["value"].to_pylist(), got["count"].to_pylist(), strict=True)) == want
    assert sum(got["count"].to_pylist()) == len(raw)
    mean, sd = got["mean"].to_numpy(), got["sd"].to_numpy()
    assert np.all(sd > 0)
    assert_allclose(got["q50"].to_numpy(), mean, atol=1e-6)
    assert_allclose(got["q95"].to_numpy() - mean, 1.6448536 * sd, rtol=1e-5)


def test_rows_are_the_guides_marginal_of_each_row(trained):
    _, run_dir = trained
    setup, state, _ = restore_run(run_dir, log=lambda _: None)
    got = read(run_dir, "region")
    site = "RandomEffectsLayer_region_theta"
    globals_ = {n: state.params[n] for n in setup.guide.globals}
    loc, sd = setup.guide.row_marginal(site, state.params[site], globals_)
    rows = len(got)  # the vocabulary; the OOV and padding rows after it are left out
    # the effects are computed compiled, the reference eagerly: a mean near 0 is held to its
    # row's sd, not to itself
    floor = 1e-6 * float(np.max(sd))
    assert_allclose(got["mean"].to_numpy(), np.asarray(loc)[:rows], rtol=1e-6, atol=floor)
    assert_allclose(got["sd"].to_numpy(), np.asarray(sd)[:rows], rtol=1e-6)


def test_streamed_in_small_chunks_equals_one_read(trained):
    """Same rows, values and counts; the same marginals to float precision (a compiled
    quadrature over 7 rows and over all of them may round its last bit differently)."""
    _, run_dir = trained
    chunked, whole = read(run_dir, "user", chunk_rows=7), read(run_dir, "user")
    assert chunked.num_rows == whole.num_rows and chunked.schema.equals(whole.schema)
    for name in whole.column_names:
        a, b = chunked[name].to_numpy(), whole[name].to_numpy()
        if np.issubdtype(b.dtype, np.floating):
            assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.max(whole["sd"])), err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_a_two_field_embedding_table_has_a_row_per_field_category_and_dimension(trained):
    data, run_dir = trained
    got = read(run_dir, "fm")  # an FM over user and item, rank 2
    users = len(set(pq.read_table(data, columns=["user"])["user"].to_pylist()))
    items = len(set(pq.read_table(data, columns=["item"])["item"].to_pylist()))
    assert got.num_rows == 2 * (users + items)
    assert_array_equal(np.unique(got["dim"].to_numpy()), [0, 1])
    assert set(got["column"].to_pylist()) == {"user", "item"}


def test_a_term_that_is_not_a_table_is_refused_in_one_line(trained):
    _, run_dir = trained
    line = refusal(run_cli("effects", f"run_dir={run_dir}", "term=dense"))
    assert "term='dense'" in line and "user" in line
    assert not (run_dir / "effects" / "dense.parquet").exists()
