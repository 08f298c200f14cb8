"""Batch scoring: gathered rows equal whole tables, output shape and contents, unseen values,
restartable parts, sharded = single device, bad input writes nothing."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose
from numpyro import handlers

from tests.service_helpers import run_with_devices, score_cfg, small_config, small_dataset
from train import loop
from train import score as score_lib
from train.checkpoint import CheckpointError
from train.data import DataError
from train.model import Columns, build_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("scored")
    data = small_dataset(base, rows=3000)
    # several row groups, so scoring has several parts
    table = pq.read_table(data)
    pq.write_table(table, base / "multi.parquet", row_group_size=700)
    loop.train(small_config(data, base / "run", **{"train.steps": 30}), log=lambda _: None)
    return base


def test_gathered_mode_equals_whole_tables(rng):
    terms = [
        {"layer": "RandomEffectsLayer", "name": "u", "inputs": ["u"]},
        {"layer": "EmbeddingLayer", "name": "e", "inputs": ["i"], "slopes": ["x"]},
        {"layer": "FMLayer", "name": "fm", "inputs": ["u", "i"], "low_rank_dim": 2},
    ]
    model = build_model(
        {"link": "gaussian", "terms": terms}, Columns(("x",), ("u", "i")), {"u": 9, "i": 5}
    )
    n = 12
    batch = {
        "numeric": jnp.asarray(rng.normal(size=(n, 1)), jnp.float32),
        "categorical": jnp.asarray(
            np.stack([rng.integers(0, 9, n), rng.integers(0, 5, n)], 1), jnp.int32
        ),
    }
    full = handlers.trace(handlers.seed(model, 0)).get_trace(batch)
    values = {
        k: v["value"] for k, v in full.items() if v["type"] == "sample" and not v["is_observed"]
    }
    gathered_values, local = dict(values), {}
    for t in model.terms:
        rows = t.rows(batch["categorical"])
        u, inv = jnp.unique(rows.ravel(), size=rows.size, fill_value=0, return_inverse=True)
        gathered_values[t.table_site] = values[t.table_site][u]
        local[t.name] = inv.reshape(rows.shape).astype(jnp.int32)
    sub = handlers.trace(handlers.substitute(handlers.seed(model, 0), gathered_values)).get_trace(
        batch, None, local
    )
    assert_allclose(
        sub["linear_predictor"]["value"], full["linear_predictor"]["value"], rtol=1e-5, atol=1e-6
    )


def test_scores_cover_every_row_with_summaries(trained, tmp_path):
    out = tmp_path / "scores"
    score_lib.score(
        score_cfg(trained / "run", trained / "multi.parquet", out, linear_predictor=True),
        log=lambda _: None,
    )
    manifest = json.loads((out / "_manifest.json").read_text())
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert manifest["num_parts"] == len(parts) == 5 and manifest["rows"] == 3000
    table = pq.read_table(out)
    assert table.num_rows == 3000
    assert sorted(table["row_id"].to_pylist()) == list(range(3000))  # each row exactly once
    names = table.schema.names
    assert names[:2] == ["row_id", "y"]  # passthrough: every non-feature column
    assert names[2:7] == ["mean", "std", "q05", "q50", "q95"]
    mean, q05, q95 = (table[c].to_numpy() for c in ("mean", "q05", "q95"))
    assert np.all((mean > 0) & (mean < 1))  # logit link: expected response is a probability
    assert np.all(q05 <= mean + 1e-6) and np.all(mean <= q95 + 1e-6)
    eta, eta_sd = table["eta_mean"].to_numpy(), table["eta_std"].to_numpy()
    # E σ(η) ≈ σ(μ / √(1 + π s²/8)) (the probit approximation): the mean response is the
    # linear predictor's, less the Jensen gap of its spread
    assert_allclose(1 / (1 + np.exp(-eta / np.sqrt(1 + np.pi * eta_sd**2 / 8))), mean, atol=0.05)
    assert not list(out.glob(".*tmp"))


def test_scores_are_reproducible_and_draws_optional(trained, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        score_lib.score(
            score_cfg(trained / "run", trained / "multi.parquet", out, raw_draws=True, draws=7),
            log=lambda _: None,
        )
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.equals(tb)
    draws = np.asarray(ta["draws"].to_pylist())
    assert draws.shape == (3000, 7)
    assert_allclose(draws.mean(1), ta["mean"].to_numpy(), rtol=1e-5)
    for level in (0.05, 0.5, 0.95):
        name = f"q{round(level * 100):02d}"
        assert_allclose(ta[name].to_numpy(), np.quantile(draws, level, axis=1), rtol=1e-5)


def test_an_empty_part_scores_to_an_empty_file_and_leaves_the_others_unchanged(trained, tmp_path):
    # scoring keeps a batch in flight while the host finishes the one before: a part with no
    # rows must start none (with several processes, every one runs the same device batches)
    folder = tmp_path / "input"
    folder.mkdir()
    table = pq.read_table(trained / "multi.parquet")
    pq.write_table(table, folder / "a.parquet", row_group_size=700)
    pq.write_table(table.slice(0, 0), folder / "z_empty.parquet")
    alone, with_empty = tmp_path / "alone", tmp_path / "with_empty"
    for data, out in ((folder / "a.parquet", alone), (folder, with_empty)):
        cfg = score_cfg(trained / "run", data, out, raw_draws=True, draws=7)
        score_lib.score(cfg, log=lambda _: None)
    manifest = json.loads((with_empty / "_manifest.json").read_text())
    assert manifest["num_parts"] == 6 and manifest["rows"] == 3000
    for i in range(5):
        name = f"part-{i:05d}.parquet"
        assert pq.read_table(with_empty / name).equals(pq.read_table(alone / name))
    empty = pq.read_table(with_empty / "part-00005.parquet")
    first = pq.read_table(alone / "part-00000.parquet")
    assert empty.num_rows == 0
    assert empty.schema.remove_metadata() == first.schema.remove_metadata()
    assert pq.read_table(with_empty).num_rows == 3000  # the folder reads as one table


def random_batch(setup, rows: int, seed: int) -> tuple[dict, dict]:
    """``rows`` examples of the small run's columns (ids among its first 20 categories), and
    every gatherable table's rows flagged as seen in training."""
    rng = np.random.default_rng(seed)
    batch = {
        "numeric": jnp.asarray(rng.normal(size=(rows, 4)), jnp.float32),
        "categorical": jnp.asarray(rng.integers(0, 20, size=(rows, 3)), jnp.int32),
    }
    seen = {
        t.table_site: jnp.ones(sum(t.num_categories), bool)
        for t in setup.model.terms
        if t.gatherable
    }
    return batch, seen


def test_a_rows_draws_do_not_depend_on_its_batch_and_match_per_batch_drawing(trained, tmp_path):
    """A row's draws are a function of its ids: whole tables drawn once, it scores the same
    in a batch of 64 as in one of 256, and the per-batch path, which draws only the rows
    each batch reads (in fewer slots than ids), gives the same scores."""
    from train.run import restore_run

    tables = {}
    for size in (64, 256):
        out = tmp_path / str(size)
        cfg = score_cfg(trained / "run", trained / "multi.parquet", out, draws=40)
        cfg.data.batch_size = size
        score_lib.score(cfg, log=lambda _: None)
        tables[size] = pq.read_table(out)
    for column in ("mean", "std", "q05", "q95"):
        assert_allclose(tables[64][column].to_numpy(), tables[256][column].to_numpy(), rtol=1e-5)

    setup, state, _ = restore_run(trained / "run", None)
    batch, seen = random_batch(setup, 256, seed=4)
    key, outs = jax.random.PRNGKey(1), []
    for budget in (score_lib.PREDRAW_BYTES, 0):
        scorer = score_lib.make_scorer(setup, 400, [0.1, 0.9], True, False, predraw_bytes=budget)
        assert scorer.predrawn == (budget > 0)
        out = scorer.score(scorer.prepare(state.params, seen, key), key, batch)
        outs.append({k: np.asarray(v) for k, v in out.items()})
    assert sorted(outs[0]) == sorted(outs[1])
    for column in outs[0]:
        assert_allclose(outs[0][column], outs[1][column], rtol=1e-5, atol=1e-6, err_msg=column)


def test_quantiles_on_the_host_equal_jnp_quantile(rng):
    x = rng.normal(size=(100, 300)).astype(np.float32)  # draws × rows
    levels = [0.0, 0.05, 0.37, 0.5, 0.95, 1.0]
    out = {score_lib.QUANTILE_DRAWS: x.T.copy(), score_lib.QUANTILE_DRAWS + "eta_": 2 * x.T}
    score_lib.finish_quantiles(out, levels)
    expected = np.asarray(jnp.quantile(jnp.asarray(x), jnp.asarray(levels), axis=0))
    assert sorted(out) == sorted(
        [f"q{round(q * 100):02d}" for q in levels] + [f"eta_q{round(q * 100):02d}" for q in levels]
    )
    for i, level in enumerate(levels):
        name = f"q{round(level * 100):02d}"
        assert_allclose(out[name], expected[i], rtol=1e-5, atol=1e-6, err_msg=name)
        assert_allclose(out["eta_" + name], 2 * expected[i], rtol=1e-5, atol=1e-6)


def test_unseen_categories_get_the_oov_row_and_are_counted(trained, tmp_path):
    table = pq.read_table(trained / "train.parquet").slice(0, 300)
    user = table["user"].to_numpy().copy()
    user[:40] = -5  # never seen in training
    table = table.set_column(table.schema.get_field_index("user"), "user", pa.array(user))
    pq.write_table(table, tmp_path / "new.parquet")
    out = tmp_path / "scores"
    score_lib.score(
        score_cfg(trained / "run", tmp_path / "new.parquet", out, linear_predictor=True, draws=200),
        log=lambda _: None,
    )
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["unseen_rows_by_column"] == {"user": 40, "item": 0, "region": 0}
    scored_eta = pq.read_table(out)
    users = table["user"].to_numpy()
    values, counts = np.unique(users[40:], return_counts=True)
    frequent = users == values[np.argmax(counts)]
    # unseen users draw their effect from the prior: wider than a well-observed user's
    eta_std = scored_eta["eta_std"].to_numpy()
    assert frequent.any() and np.median(eta_std[:40]) > 1.5 * np.median(eta_std[frequent])
    scored = pq.read_table(out)
    flags = scored["unseen_categories"].to_numpy()
    assert flags[:40].tolist() == [1] * 40 and flags[40:].sum() == 0
    assert np.isfinite(scored["mean"].to_numpy()).all()


def test_rerun_skips_finished_parts_and_redoes_missing_ones(trained, tmp_path):
    out = tmp_path / "scores"
    cfg = score_cfg(trained / "run", trained / "multi.parquet", out)
    score_lib.score(cfg, log=lambda _: None)
    keep = out / "part-00001.parquet"
    stamp = keep.stat().st_mtime_ns
    os.remove(out / "part-00003.parquet")  # as if the job died before finishing it
    (out / ".part-00003.parquet.tmp").write_bytes(b"half a file")
    score_lib.score(cfg, log=lambda _: None)
    assert keep.stat().st_mtime_ns == stamp
    manifest = json.loads((out / "_manifest.json").read_text())
    skipped = [p["part"] for p in manifest["parts"] if p["skipped"]]
    assert skipped == [0, 1, 2, 4]
    assert pq.read_table(out).num_rows == 3000
    assert not (out / ".part-00003.parquet.tmp").exists()


def test_parts_split_over_processes_exactly_once(trained):
    parts = score_lib.plan_parts([str(trained / "multi.parquet")] * 3)
    for count in (1, 2, 3, 4):
        seen = sorted(
            p.index for i in range(count) for p in score_lib.parts_for_process(parts, i, count)
        )
        assert seen == list(range(len(parts)))
        need = score_lib.batches_per_process(parts, count, 256)
        assert need >= max(
            -(-sum(p.rows for p in score_lib.parts_for_process(parts, i, count)) // 256)
            for i in range(count)
        )


def test_sharded_scores_equal_single_device(trained, tmp_path):
    assert jax.device_count() == 8
    out8 = tmp_path / "eight"
    cfg = score_cfg(trained / "run", trained / "multi.parquet", out8)
    score_lib.score(cfg, log=lambda _: None)
    code = f"""
        import json
        import pyarrow.parquet as pq
        from tests.test_score import score_cfg
        from train import score
        cfg = score_cfg({str(trained / "run")!r}, {str(trained / "multi.parquet")!r},
                        {str(tmp_path / "one")!r})
        score.score(cfg, log=lambda _: None)
        t = pq.read_table({str(tmp_path / "one")!r})
        print(json.dumps({{"row_id": t["row_id"].to_pylist(), "mean": t["mean"].to_pylist(),
                           "q95": t["q95"].to_pylist()}}))
    """
    one = run_with_devices(1, code)
    eight = pq.read_table(out8)
    assert eight["row_id"].to_pylist() == one["row_id"]
    assert_allclose(eight["mean"].to_numpy(), one["mean"], rtol=1e-4, atol=1e-6)
    assert_allclose(eight["q95"].to_numpy(), one["q95"], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ bad input writes nothing


def _bad(trained, tmp_path, mutate):
    table = pq.read_table(trained / "train.parquet").slice(0, 100)
    table = mutate(table)
    pq.write_table(table, tmp_path / "bad.parquet")
    return tmp_path / "bad.parquet"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop_columns(["x2"]), "column 'x2' is missing"),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("x1"), "x1", pc.cast(t["x1"], pa.string())
            ),
            "'x1' has non-numeric type",
        ),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("x4"), "x4", pa.array([np.nan] + [0.0] * 99, pa.float32())
            ),
            "'x4': 1 NaN/inf",
        ),
    ],
)
def test_bad_scoring_data_writes_nothing(trained, tmp_path, mutate, message):
    path = _bad(trained, tmp_path, mutate)
    out = tmp_path / "scores"
    with pytest.raises(DataError, match=message):
        score_lib.score(score_cfg(trained / "run", path, out), log=lambda _: None)
    assert not out.exists()


def test_run_without_checkpoint_is_an_error(trained, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        score_lib.score(
            score_cfg(tmp_path / "nothing", trained / "train.parquet", tmp_path / "s"),
            log=lambda _: None,
        )
    assert not (tmp_path / "s").exists()


def test_checkpoint_of_another_structure_is_refused(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    step_dir = max(
        (p for p in (run / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    meta_file = next(step_dir.glob("meta/*"))
    meta = json.loads(meta_file.read_text())
    meta["table_sizes"]["user"] += 17  # the saved model no longer matches its tables
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="different model structure"):
        score_lib.score(
            score_cfg(run, trained / "train.parquet", tmp_path / "s"), log=lambda _: None
        )
    assert not (tmp_path / "s").exists()


def test_device_and_host_quantiles_agree_on_a_trained_run(trained):
    from train.run import restore_run

    setup, state, _ = restore_run(trained / "run", None)
    batch, seen = random_batch(setup, 64, seed=3)
    key = jax.random.PRNGKey(5)
    levels = [0.05, 0.5, 0.95]
    outputs = []
    for host in (False, True):
        scorer = score_lib.make_scorer(setup, 50, levels, True, False, host)
        context = scorer.prepare(state.params, seen, key)
        out = {k: np.asarray(v) for k, v in scorer.score(context, key, batch).items()}
        if host:
            score_lib.finish_quantiles(out, levels)
        outputs.append(out)
    device, host = outputs
    assert sorted(device) == sorted(host)
    for name in device:
        assert_allclose(host[name], device[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("link", ["gaussian", "poisson"])
def test_predictive_intervals_hold_held_out_y_at_their_level(tmp_path, link):
    """``predictive=true``: the 90% interval of y drawn from the likelihood holds about 90%
    of held-out observations; the interval of E[y | θ] alone holds far fewer (it leaves the
    observation noise out)."""
    from tests.service_helpers import crossed_config
    from train import synth

    cols = synth.crossed_effects(
        tmp_path / "all.parquet",
        12_000,
        {"a": 20, "b": 50},
        {"a": 0.5, "b": 0.3},
        link,
        0.5,
        slope=0.4,
        seed=3,
    )
    table = pq.read_table(tmp_path / "all.parquet")
    pq.write_table(table.slice(0, 8000), tmp_path / "train.parquet")
    pq.write_table(table.slice(8000), tmp_path / "held_out.parquet")
    cfg = crossed_config(
        tmp_path / "train.parquet", tmp_path / "run", ["a", "b"], link, **{"train.steps": 2000}
    )
    loop.train(cfg, log=lambda _: None)
    out = tmp_path / "scores"
    score_lib.score(
        score_cfg(tmp_path / "run", tmp_path / "held_out.parquet", out, predictive=True, draws=200),
        log=lambda _: None,
    )
    got = pq.read_table(out)
    y = got["y"].to_numpy()
    assert np.allclose(y, cols["y"][8000:])
    lo, hi = got["pred_q05"].to_numpy(), got["pred_q95"].to_numpy()
    held = np.mean((lo <= y) & (y <= hi))
    if link == "gaussian":
        assert 0.86 <= held <= 0.94, held
    else:  # counts: [q05, q95] holds its atoms too, so its level is what Poisson(mean) gives
        from jax.scipy.stats import poisson

        rate = got["mean"].to_numpy()
        level = np.mean(poisson.cdf(hi, rate) - poisson.cdf(np.ceil(lo) - 1, rate))
        assert level > 0.9 and abs(held - level) < 0.02, (held, level)
    mean_only = np.mean((got["q05"].to_numpy() <= y) & (y <= got["q95"].to_numpy()))
    assert mean_only < 0.6, mean_only
    assert np.all(got["pred_std"].to_numpy() > got["std"].to_numpy())
