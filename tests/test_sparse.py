"""Row-sparse SVI: same posterior as the dense path, untouched rows stay put, no all-gather of
a table in the compiled step, and 1/8 of the table per device."""

from __future__ import annotations

import re

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import load_params, small_config
from train import data as data_lib
from train import loop, pipeline
from train import setup as train_setup
from train import step as step_lib
from train.dedup import host_rows
from train.plan import ShardingPlan
from train.sparse import batch_rows, table_rows
from train.starts import ROW_PRECISION_FLOOR
from train.state import guide_params

C = 60


@pytest.fixture(scope="module")
def gaussian_data(tmp_path_factory):
    rng = np.random.default_rng(3)
    n = 6000
    p = 1.0 / np.arange(1, C + 1) ** 0.8
    group = rng.choice(C, size=n, p=p / p.sum())
    effects = rng.normal(0, 0.8, C)
    y = 0.5 + effects[group] + rng.normal(0, 0.5, n)
    path = tmp_path_factory.mktemp("gauss") / "train.parquet"
    pq.write_table(pa.table({"g": group, "x1": rng.normal(size=n), "y": y}), path)
    return path


def _config(path, run_dir, sparse, steps=4000):
    cfg = small_config(
        path,
        run_dir,
        **{
            "data.numeric": ["x1"],
            "data.categorical": ["g"],
            "data.batch_size": 256,
            "model.link": "gaussian",
            "train.steps": steps,
            "train.log_every": 500,
            "checkpoint.every": 10_000,
            "optim.lr": 0.05,
            "optim.end_lr_factor": 0.01,
            "mesh.data": 1,  # one of the fake devices: the sharded sparse step is tested apart
        },
    )
    cfg.model.terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"], "sparse": sparse},
    ]
    return cfg


@pytest.fixture(scope="module")
def fitted_runs(gaussian_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("fits")
    for sparse in (False, True):
        loop.train(_config(gaussian_data, base / str(sparse), sparse), log=lambda _: None)
    return {sparse: base / str(sparse) for sparse in (False, True)}


@pytest.fixture(scope="module")
def fitted(fitted_runs):
    return {sparse: load_params(run) for sparse, run in fitted_runs.items()}


def test_sparse_and_dense_reach_the_same_posterior(fitted):
    dense, sparse = fitted[False], fitted[True]
    site = "RandomEffectsLayer_g_theta"
    seen = slice(0, C)  # vocabulary rows; row C is the OOV row
    m_d, m_s = dense[f"{site}.loc"][seen], sparse[f"{site}.loc"][seen]
    assert np.corrcoef(m_d, m_s)[0, 1] > 0.995
    assert np.abs(m_d - m_s).max() < 0.08
    sd_d = np.log1p(np.exp(dense[f"{site}.raw_scale"][seen]))
    sd_s = np.log1p(np.exp(sparse[f"{site}.raw_scale"][seen]))
    assert 0.8 < np.median(sd_s / sd_d) < 1.25
    lam_d = np.log1p(np.exp(dense["RandomEffectsLayer_g_scale.loc"]))  # softplus^-1 space
    lam_s = np.log1p(np.exp(sparse["RandomEffectsLayer_g_scale.loc"]))
    assert abs(float(lam_s) / float(lam_d) - 1) < 0.1
    np.testing.assert_allclose(
        sparse["InterceptLayer_bias_beta.loc"], dense["InterceptLayer_bias_beta.loc"], atol=0.08
    )
    # the structured guide couples sparse rows too: each seen row's mean follows the
    # intercept's draw as the dense rows' do, so the intercept keeps the same (wide) sd
    sd_b = [np.log1p(np.exp(p["InterceptLayer_bias_beta.raw_scale"])) for p in (dense, sparse)]
    assert abs((sd_b[1] / sd_b[0]).item() - 1) < 0.2
    a_d, a_s = dense[f"{site}.coupling"][seen], sparse[f"{site}.coupling"][seen]
    assert np.median(a_d) < -0.5 and np.median(a_s) < -0.5  # rows move against the intercept
    assert np.median(np.abs(a_d - a_s)) < 0.1


def test_rows_never_seen_are_never_touched(fitted):
    site = "RandomEffectsLayer_g_theta"
    sparse = fitted[True]
    untouched = slice(C, None)  # OOV + padding rows
    assert np.all(sparse[f"{site}.loc"][untouched] == 0.0)
    # the default (conditional) guide starts a row with no training data at the precision
    # floor: log τ = log(0 · I + floor)
    init_raw = np.log(np.float32(ROW_PRECISION_FLOOR))
    np.testing.assert_allclose(sparse[f"{site}.raw_scale"][untouched], init_raw, rtol=1e-6)
    assert np.all(sparse[f"{site}.coupling"][untouched] == 0.0)


def test_scoring_a_sparse_run_matches_the_dense_one(fitted_runs, gaussian_data, tmp_path):
    from omegaconf import OmegaConf

    from train import score as score_lib
    from train.config import ScoreConfig

    means = {}
    for sparse, run in fitted_runs.items():
        cfg = OmegaConf.structured(ScoreConfig)
        cfg.run_dir, cfg.output, cfg.data.path = (
            str(run),
            str(tmp_path / str(sparse)),
            str(gaussian_data),
        )
        cfg.data.batch_size, cfg.draws = 512, 100
        manifest = score_lib.score(cfg, log=lambda _: None)
        assert manifest["rows"] == 6000
        table = pq.read_table(tmp_path / str(sparse))  # parts in input order
        means[sparse] = table["mean"].to_numpy()
    # the sparse run's table is read from its row state; same posterior, same predictions
    assert np.corrcoef(means[False], means[True])[0, 1] > 0.995
    assert np.abs(means[False] - means[True]).max() < 0.15


def test_duplicate_ids_are_combined_with_frequency_weights():
    import jax.numpy as jnp

    from train.model import Columns, build_model
    from train.sparse import SparseTable

    model = build_model(
        {
            "link": "gaussian",
            "terms": [
                {"layer": "RandomEffectsLayer", "name": "g", "inputs": ["g"], "sparse": True}
            ],
        },
        Columns((), ("g",)),
        {"g": 7},
    )
    term = model.terms[0]
    table = {term.table_site: SparseTable(term.table_site, term, 8)}
    counts = {term.table_site: jnp.asarray([10.0, 4, 2, 1, 1, 1, 1, 0])}
    cat = jnp.asarray([[1], [1], [0], [1], [3]], jnp.int32)
    expected_w = [1 * 100 / 5 / 10, 3 * 100 / 5 / 4, 1 * 100 / 5 / 1, 0, 0]
    host = {k: jnp.asarray(v) for k, v in host_rows(np.asarray(cat), table_rows(table)).items()}
    # fill ids point past the table (dropped); the host's are distinct, so the row arrays are
    # sorted and unique as the step's gathers and scatters are told
    for batch, fills in (({"categorical": cat}, [8, 8]), ({"categorical": cat, **host}, [8, 9])):
        uniq, local, weights = batch_rows(batch, table, counts, num_data=100)
        u, w = np.asarray(uniq[term.table_site]), np.asarray(weights[term.table_site])
        assert u.tolist() == [0, 1, 3, *fills]
        np.testing.assert_allclose(w, expected_w)
        ids, rows = local["g"]
        assert np.asarray(ids)[:, 0].tolist() == [1, 1, 0, 1, 2] and rows == 5


@pytest.mark.parametrize("lookup", [True, False])
def test_host_dedup_matches_numpy_unique_over_several_fields(lookup, monkeypatch):
    from train import dedup
    from train.model import Columns, build_model
    from train.sparse import COUNT, LOCAL, UNIQ, SparseTable

    if not lookup:  # tables too large for a scratch fall back to searchsorted
        monkeypatch.setattr(dedup, "SCRATCH_MAX_ROWS", 0)
    model = build_model(
        {
            "link": "gaussian",
            "terms": [
                {"layer": "FMLayer", "name": "fm", "inputs": ["a", "b"], "sparse": True},
            ],
        },
        Columns((), ("a", "b")),
        {"a": 40, "b": 300},
    )
    term = model.terms[0]
    rows = int(sum(term.num_categories))
    table = {term.table_site: SparseTable(term.table_site, term, rows)}
    rng = np.random.default_rng(0)
    for _ in range(3):  # the scratch is reused across batches: stale entries must not leak
        cat = np.stack([rng.integers(0, 41, 500), rng.zipf(1.5, 500) % 301], 1).astype(np.int32)
        got = host_rows(cat, table_rows(table))
        flat = (cat + term.row_offsets[None, :]).ravel()
        u, inv, c = np.unique(flat, return_inverse=True, return_counts=True)
        site = term.table_site
        k = len(got[UNIQ + site])
        assert k >= len(u) and got[UNIQ + site][: len(u)].tolist() == u.tolist()
        assert got[UNIQ + site][len(u) :].tolist() == list(range(rows, rows + k - len(u)))
        assert got[COUNT + site].tolist() == [*c.tolist(), *[0] * (k - len(u))]
        np.testing.assert_array_equal(got[LOCAL + site], inv.reshape(cat.shape))


COLLECTIVE = re.compile(
    r"= (?P<type>.+?) (?P<op>all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter)(?:-start)?\("
)


def collective_sizes(hlo: str) -> list[tuple[str, int]]:
    """(op, largest element count among its results) for every collective in an HLO text."""
    out = []
    for m in COLLECTIVE.finditer(hlo):
        dims = re.findall(r"\[([\d,]*)\]", m.group("type"))
        sizes = [int(np.prod([int(d) for d in ds.split(",") if d])) for ds in dims]
        out.append((m.group("op"), max(sizes, default=1)))
    return out


def test_compiled_sparse_step_never_gathers_a_table(tmp_path):
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    n = 40_000
    path = tmp_path / "big.parquet"
    pq.write_table(
        pa.table({"g": rng.permutation(n), "x1": rng.normal(size=n), "y": rng.normal(size=n)}), path
    )
    cfg = _config(path, tmp_path / "run", True, steps=2)
    cfg.mesh.data, cfg.mesh.model = 1, 8
    store, vocabs = data_lib.prepare(cfg.data, tmp_path / "run", "gaussian")
    sizes = {c: v.size for c, v in vocabs.items()}
    setup = train_setup.make_setup(cfg, sizes, store.num_rows, ShardingPlan.from_config(cfg))
    site = "RandomEffectsLayer_g_theta"
    rows = setup.sites[site].shape[0]
    assert site in setup.sparse and rows % 8 == 0 and rows > n
    state = jax.jit(setup.init, out_shardings=setup.shardings)()
    table = state.params[site]["row_state"]  # loc, raw_scale and Adam's m, v of each
    assert table.shape == (rows, 6)
    assert {s.data.shape for s in table.addressable_shards} == {(rows // 8, 6)}  # 1/8 each

    step = step_lib.make_train_step(setup, {c: v.counts for c, v in vocabs.items()})
    local = step.prepare(pipeline.StepBatches(store, 256, 0)(0))
    batch = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in local.items()}
    hlo = jax.jit(lambda s, b: step(s, b)).lower(state, batch).compile().as_text()
    collectives = collective_sizes(hlo)
    assert collectives, "expected the sharded gather to communicate"
    # only batch-sized traffic crosses devices: at most the 256 rows of a batch, each with its
    # 6 row-state fields; a table shard is ~5,000 rows
    assert max(size for _, size in collectives) <= 256 * 6, collectives
    assert not [op for op, _ in collectives if op == "all-gather"]
    new_state, loss = step(state, batch)
    assert np.isfinite(float(loss))
    assert {s.data.shape for s in new_state.params[site]["row_state"].addressable_shards} == {
        (rows // 8, 6)
    }


def test_device_dedup_step_equals_host_dedup_step(gaussian_data, tmp_path, monkeypatch):
    """With several processes the step deduplicates rows on device; same update as the host's."""
    cfg = _config(gaussian_data, tmp_path / "run", True, steps=3)
    cfg.mesh.data, cfg.mesh.model = 2, 4
    store, vocabs = data_lib.prepare(cfg.data, tmp_path / "run", "gaussian")
    sizes = {c: v.size for c, v in vocabs.items()}
    setup = train_setup.make_setup(cfg, sizes, store.num_rows, ShardingPlan.from_config(cfg))
    counts = {c: v.counts for c, v in vocabs.items()}
    host_step = step_lib.make_train_step(setup, counts)
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # as each process of a 2-process job
    device_step = step_lib.make_train_step(setup, counts)
    monkeypatch.undo()
    assert set(host_step.batch_shardings) > set(device_step.batch_shardings)
    init = jax.jit(setup.init, out_shardings=setup.shardings)
    states = {"host": init(), "device": init()}
    batches = pipeline.StepBatches(store, 256, 0)
    for s in range(3):
        raw = batches(s)
        for name, step in (("host", host_step), ("device", device_step)):
            local = step.prepare(raw)
            batch = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in local.items()}
            states[name], loss = step(states[name], batch)
            if name == "host":
                host_loss = float(loss)
            else:
                np.testing.assert_allclose(float(loss), host_loss, rtol=1e-5)
    loc = np.asarray(guide_params(states["host"].params)["RandomEffectsLayer_g_theta"]["loc"])
    assert int(states["host"].step) == 3 and np.count_nonzero(loc) > 10  # rows were trained
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(states["host"]),
        jax.tree_util.tree_leaves(states["device"]),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=str(path)
        )


def test_unique_row_arrays_take_few_static_lengths():
    from train.dedup import row_capacity

    lengths = [row_capacity(found, 4096) for found in range(1, 4097)]
    assert all(length >= found for found, length in enumerate(lengths, 1))
    assert max(lengths) == 4096 and lengths == sorted(lengths)
    assert len(set(lengths)) <= 13  # compilations of the step, whatever the batch holds
    # waste above the rows found stays under 50% past the smallest length
    assert all(length <= max(64, 1.5 * found) for found, length in enumerate(lengths, 1))
    assert row_capacity(400, 501) == 501  # a small table never needs more than its rows


@pytest.mark.parametrize("values", [[5], [3, 3, 3], [9, 1, 9, 4, 1, 0], list(range(50, 0, -1))])
def test_host_unique_matches_numpy(values):
    from train.dedup import _unique

    x = np.asarray(values, np.int64)
    for got, want in zip(
        _unique(x), np.unique(x, return_inverse=True, return_counts=True), strict=True
    ):
        np.testing.assert_array_equal(got, want)
