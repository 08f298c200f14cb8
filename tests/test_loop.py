"""The training job: exact resume, restore across device counts, refusal of foreign
checkpoints, bad input before any step, sharded = single device."""

from __future__ import annotations

import csv
import json

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose

from tests.service_helpers import load_params, run_with_devices, small_config, small_dataset
from train import loop
from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.data import DataError
from train.summary import summarize, write_csv


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"))


def test_train_writes_checkpoint_metrics_and_vocab(dataset, tmp_path):
    cfg = small_config(dataset, tmp_path / "run")
    result = loop.train(cfg, log=lambda _: None)
    assert result["step"] == 20 and not result["stopped_early"]
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10",
        "20",
    ]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [5, 10, 15, 20]
    assert all(np.isfinite(x["loss"]) and x["examples_per_s"] > 0 for x in lines)
    assert all(0.0 <= x["input_wait"] <= 1.0 for x in lines)
    assert 0.0 <= result["input_wait"] <= 1.0
    manifest = json.loads((run / "vocab" / "manifest.json").read_text())
    assert set(manifest["columns"]) == {"user", "item", "region"}


def test_exact_resume_bit_for_bit(dataset, tmp_path):
    straight = small_config(dataset, tmp_path / "straight", **{"train.steps": 24})
    loop.train(straight, log=lambda _: None)
    half = small_config(
        dataset, tmp_path / "resumed", **{"train.steps": 24, "train.stop_after": 12}
    )
    assert loop.train(half, log=lambda _: None)["stopped_early"]
    resumed = small_config(dataset, tmp_path / "resumed", **{"train.steps": 24})
    messages = []
    loop.train(resumed, log=messages.append)
    assert any("resumed from step 12" in m for m in messages)
    a, b = load_params(tmp_path / "straight"), load_params(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_rerun_with_same_total_does_nothing_more(dataset, tmp_path):
    cfg = small_config(dataset, tmp_path / "run", **{"train.steps": 10})
    loop.train(cfg, log=lambda _: None)
    before = load_params(tmp_path / "run")
    result = loop.train(cfg, log=lambda _: None)
    assert result["step"] == 10
    after = load_params(tmp_path / "run")
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_checkpoint_from_another_model_is_refused(dataset, tmp_path):
    loop.train(small_config(dataset, tmp_path / "run", **{"train.steps": 10}), log=print)
    other = small_config(dataset, tmp_path / "run", **{"train.steps": 20})
    other.model.terms = [*other.model.terms[:2]]  # drop the tables: different structure
    with pytest.raises(ConfigError, match=r"model\.terms: changed \(5 → 2 entries\)"):
        loop.train(other, log=lambda _: None)
    other.train.resume = "force"  # forcing changed settings never forces another structure
    with pytest.raises(CheckpointError, match="different model structure"):
        loop.train(other, log=lambda _: None)
    assert load_params(tmp_path / "run")  # the checkpoint is still intact


def test_dry_run_prints_plan_and_writes_no_checkpoint(dataset, tmp_path):
    cfg = small_config(
        dataset, tmp_path / "run", **{"dry_run": True, "mesh.data": 2, "mesh.model": 4}
    )
    out = []
    result = loop.train(cfg, log=out.append)
    plan = out[-2]
    assert "RandomEffectsLayer_user_theta.loc" in plan and "P('model',)" in plan
    assert "bytes/device" in plan and "mesh {'data': 2, 'model': 4}" in plan
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the model written down: priors, the linear predictor from every term, the likelihood
    model = out[-1]
    assert model.startswith("model:") and model.endswith("y_i ~ Bernoulli(logit⁻¹(η_i))")
    assert "θ_user ~ Normal(0, λ_user)" in model
    eta = next(line for line in result["model"].splitlines() if "η_i =" in line)
    assert eta.split("=", 1)[1].strip() == (
        "β_bias + [x1, x2, x3, x4]·β_dense + θ_user[user_i] + θ_region[region_i] + "
        "FM(θ_fm[user_i], θ_fm[item_i])"
    )
    assert not (tmp_path / "run" / "model.txt").exists()  # a dry run writes no run files


def test_sharded_training_matches_single_device(dataset, tmp_path):
    assert jax.device_count() == 8
    cfg = small_config(dataset, tmp_path / "eight", **{"mesh.data": 2, "mesh.model": 4})
    loop.train(cfg, log=lambda _: None)
    eight = load_params(tmp_path / "eight")
    code = f"""
        import json, numpy as np
        from tests.service_helpers import small_config, load_params
        from train import loop
        cfg = small_config({str(dataset)!r}, {str(tmp_path / "one")!r},
                           **{{"mesh.data": 1, "mesh.model": 1}})
        loop.train(cfg, log=lambda _: None)
        print(json.dumps({{k: v.tolist() for k, v in load_params(cfg.run_dir).items()}}))
    """
    one = run_with_devices(1, code)
    for k, v in eight.items():
        ref = np.asarray(one[k], dtype=np.float32)
        # tables were padded to the model axis (4) on 8 devices, not on 1
        rows = min(ref.shape[0], v.shape[0]) if v.ndim else None
        got = v[:rows] if v.ndim else v
        ref = ref[:rows] if ref.ndim else ref
        # float32 sums in another order, over every step: the tolerance is relative to the
        # leaf's own size, so near-zero elements of a leaf (couplings) get the same slack
        # as its largest (measured: up to 4e-4 of the leaf's largest element)
        slack = 2e-5 + 2e-4 * float(np.abs(ref).max())
        assert_allclose(got, ref, rtol=2e-4, atol=slack, err_msg=k)


def test_checkpoint_from_8_devices_restores_on_1_and_4_and_continues(dataset, tmp_path):
    cfg = small_config(
        dataset, tmp_path / "run", **{"mesh.data": 1, "mesh.model": 8, "train.steps": 10}
    )
    loop.train(cfg, log=lambda _: None)
    saved = load_params(tmp_path / "run")
    for devices in (1, 4):
        code = f"""
            import json, numpy as np
            from tests.service_helpers import small_config, load_params
            from train import loop
            from train.run import restore_run
            _, state, meta = restore_run({str(tmp_path / "run")!r})
            table = state.params["RandomEffectsLayer_user_theta"]["loc"]
            out = {{"step": meta["step"], "shards": len(table.addressable_shards),
                    "user_loc": np.asarray(table).tolist()}}
            print(json.dumps(out))
        """
        got = run_with_devices(devices, code)
        assert got["step"] == 10 and got["shards"] == devices
        assert_allclose(got["user_loc"], saved["RandomEffectsLayer_user_theta.loc"])
    # and training continues from it on 4 devices (same padded table size: 8 is a multiple of 4
    # only when the vocabulary pads alike, so the run keeps its model axis of 8 -> use 8 here)
    code = f"""
        import json
        from tests.service_helpers import small_config
        from train import loop
        cfg = small_config({str(dataset)!r}, {str(tmp_path / "run")!r},
                           **{{"mesh.data": 1, "mesh.model": 4, "train.steps": 16}})
        msgs = []
        result = loop.train(cfg, log=msgs.append)
        print(json.dumps({{"step": result["step"], "msgs": msgs}}))
    """
    got = run_with_devices(4, code)
    assert got["step"] == 16 and any("resumed from step 10" in m for m in got["msgs"])


def test_summary_csv_has_global_sites_named_by_term(dataset, tmp_path):
    loop.train(small_config(dataset, tmp_path / "run"), log=lambda _: None)
    rows = summarize(tmp_path / "run", draws=200)
    sites = {r["site"] for r in rows}
    assert "AdaptiveLayer_dense_beta" in sites and "RandomEffectsLayer_user_scale" in sites
    assert not any("theta" in s and "fm" not in s for s in sites)  # tables are not global
    assert all(r["q05"] <= r["q50"] <= r["q95"] and r["std"] >= 0 for r in rows)
    write_csv(rows, tmp_path / "run" / "summary.csv")
    with open(tmp_path / "run" / "summary.csv") as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0]) == ["site", "index", "label", "mean", "std", "q05", "q50", "q95"]
    assert len(read) == len(rows)
    dense = [r["label"] for r in read if r["site"] == "AdaptiveLayer_dense_beta"]
    assert dense == ["x1", "x2", "x3", "x4"]  # coefficients named by their input columns
    assert all(r["label"] == "" for r in read if r["site"] != "AdaptiveLayer_dense_beta")


def test_user_model_target(dataset, tmp_path):
    cfg = small_config(dataset, tmp_path / "run")
    target = "tests.user_models.random_intercepts"
    cfg.model._target_ = target
    loop.train(cfg, log=lambda _: None)
    params = load_params(tmp_path / "run", trust_model=target)
    assert "RandomEffectsLayer_mine_theta.loc" in params


def test_a_users_own_layer_by_import_path_trains_and_restores_only_when_trusted(dataset, tmp_path):
    """A term's layer may be a class of the user's own (``layer: my_pkg.MyLayer``): the run
    trains it, and restoring it (which imports it) needs ``trust_model`` to name it."""
    layer = "tests.user_models.ScaledSumLayer"
    terms = [
        {"layer": "InterceptLayer", "name": "bias"},
        {"layer": layer, "name": "sum", "inputs": ["x1", "x2"], "prior_scale": 0.5},
        {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
    ]
    run = tmp_path / "run"
    loop.train(small_config(dataset, run, **{"model.terms": terms}), log=lambda _: None)
    with pytest.raises(ConfigError, match=rf"trust_model={layer}"):
        load_params(run)
    params = load_params(run, trust_model=f"some.other.fn, {layer}")
    assert params["ScaledSumLayer_sum_beta.loc"].shape == (1,)
    sites = {r["site"] for r in summarize(run, draws=50, trust_model=layer)}
    assert "ScaledSumLayer_sum_beta" in sites


# ------------------------------------------------------------------ bad input, before any step


def _write(tmp_path, table):
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    return path


def _good_columns(n=64):
    rng = np.random.default_rng(0)
    cols = {f"x{j}": rng.normal(size=n) for j in range(1, 5)}
    cols.update(
        {
            "user": rng.integers(0, 5, n),
            "item": rng.integers(0, 3, n),
            "region": np.array(["a", "b"] * (n // 2)),
            "y": rng.integers(0, 2, n),
        }
    )
    return cols


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda c: c.pop("x3"), DataError, "column 'x3' is missing"),
        (lambda c: c.update(x2=np.array(["a"] * 64)), DataError, "'x2' has non-numeric type"),
        (lambda c: c["x1"].__setitem__(4, np.nan), DataError, "'x1': 1 NaN/inf"),
        (lambda c: c["y"].__setitem__(0, 3), DataError, "'y'.*support of the 'logit' link"),
        (lambda c: [c.__setitem__(k, v[:0]) for k, v in list(c.items())], DataError, "empty"),
    ],
)
def test_bad_data_fails_before_any_step(tmp_path, mutate, error, message):
    cols = _good_columns()
    mutate(cols)
    path = _write(tmp_path, pa.table(cols))
    cfg = small_config(path, tmp_path / "run")
    with pytest.raises(error, match=message):
        loop.train(cfg, log=lambda _: None)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "vocab").exists()


def test_batch_not_divisible_by_data_devices(dataset, tmp_path):
    cfg = small_config(dataset, tmp_path / "run", **{"data.batch_size": 60, "mesh.data": 8})
    with pytest.raises(ConfigError, match=r"batch_size=60 .*8 data-parallel devices"):
        loop.train(cfg, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_failed_start_leaves_existing_checkpoint_untouched(dataset, tmp_path):
    loop.train(small_config(dataset, tmp_path / "run", **{"train.steps": 10}), log=print)
    before = load_params(tmp_path / "run")
    bad = small_config(dataset, tmp_path / "run", **{"model.link": "poisonn"})
    with pytest.raises(ConfigError, match="unknown link"):
        loop.train(bad, log=lambda _: None)
    after = load_params(tmp_path / "run")
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_report_shows_training_rate_and_input_wait(dataset, tmp_path):
    from train import report

    run = tmp_path / "run"
    loop.train(small_config(dataset, run), log=lambda _: None)
    page = report.build(run).read_text()
    assert "20 steps; final ELBO per row" in page
    assert "examples/s; waiting for data" in page
    # a run written before input_wait was recorded still gets its report
    metrics = run / "metrics.jsonl"
    old = [json.loads(x) for x in metrics.read_text().splitlines()]
    metrics.write_text(
        "".join(json.dumps({k: v for k, v in m.items() if k != "input_wait"}) + "\n" for m in old)
    )
    page = report.build(run).read_text()
    assert "examples/s</p>" in page and "waiting for data" not in page
