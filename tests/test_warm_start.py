"""A run continued on new data (``init_from``): the vocabulary extended with known ids kept,
the known rows' and globals' guide parameters and optimizer moments carried over, new rows
at the prior; the new run resumes exactly, scores its new categories as seen, and a model
that is not the same is refused naming the key."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service_helpers import load_params, quiet_config, run_cli, run_with_devices
from train import effects, loop
from train.config import ConfigError
from train.run import restore_run
from train.vocab import Vocab, load_all

SITE = "RandomEffectsLayer_user_theta"


def day(path, users: list[str], effects: dict[str, float], rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    user = rng.choice(users, rows)
    x = rng.normal(size=rows).astype(np.float32)
    y = 0.2 + 0.5 * x + np.array([effects[u] for u in user]) + rng.normal(0, 0.3, rows)
    pq.write_table(pa.table({"user": user, "x": x, "y": y.astype(np.float32)}), path)


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    root = tmp_path_factory.mktemp("days")
    rng = np.random.default_rng(0)
    effects = {f"u{i:03d}": float(rng.normal(0, 0.5)) for i in range(90)}
    first, second = root / "day1.parquet", root / "day2.parquet"
    day(first, [f"u{i:03d}" for i in range(60)], effects, 3000, 1)
    day(second, [f"u{i:03d}" for i in range(20, 90)], effects, 3000, 2)  # 30 new, 20 gone
    return first, second, effects


def settings(**more) -> dict:
    return {
        "data.numeric": ["x"],
        "data.categorical": ["user"],
        "data.batch_size": 300,
        "model.link": "gaussian",
        "model.terms": [
            {"layer": "InterceptLayer", "name": "bias"},
            {"layer": "AdaptiveLayer", "name": "w", "inputs": ["x"]},
            {"layer": "RandomEffectsLayer", "name": "user", "inputs": ["user"]},
        ],
        "train.steps": 400,
        "checkpoint.every": 400,
        "mesh.data": 1,
        **more,
    }


def level_effects(run) -> pa.Table:
    setup, state, _ = restore_run(run, log=lambda _: None)
    batches = effects.effect_batches(setup, state, run / "vocab", "user")
    return pa.Table.from_batches(list(batches))


def train(data, run, **more):
    loop.train(quiet_config(data, run, settings(**more)), log=lambda _: None)


@pytest.fixture(scope="module")
def day1(days, tmp_path_factory):
    run = tmp_path_factory.mktemp("day1") / "run"
    train(days[0], run, **{"optim.guide": "mean_field", "optim.start": "zero"})
    return run


def test_the_vocabulary_grows_and_every_known_row_and_moment_carries_over(days, day1, tmp_path):
    run = tmp_path / "day2"
    lines: list[str] = []
    cfg = quiet_config(
        days[1],
        run,
        settings(
            **{
                "optim.guide": "mean_field",
                "optim.start": "zero",
                "optim.lr": 1e-12,  # one step that moves nothing measurable
                "train.steps": 1,
                "checkpoint.every": 1,
                "init_from": str(day1),
            }
        ),
    )
    loop.train(cfg, log=lines.append)
    assert any(line.startswith(f"continuing {day1}") for line in lines), lines

    before, after = (
        load_all(day1 / "vocab", ["user"])["user"],
        load_all(run / "vocab", ["user"])["user"],
    )
    assert after.values[:60].to_pylist() == before.values.to_pylist()
    assert sorted(after.values[60:].to_pylist()) == [f"u{i:03d}" for i in range(60, 90)]
    assert after.inherited == 60
    gone = [i for i, v in enumerate(before.values.to_pylist()) if int(v[1:]) < 20]
    assert (after.counts[gone] == 0).all() and (after.totals[gone] == before.counts[gone]).all()
    assert after.counts.sum() == 3000 and after.totals.sum() == 6000

    old, new = load_params(day1), load_params(run)
    for key in old:
        if key.startswith(SITE):
            np.testing.assert_allclose(new[key][:60], old[key][:60], atol=1e-6, err_msg=key)
        else:
            np.testing.assert_allclose(new[key], old[key], atol=1e-6, err_msg=key)
    # the 30 new rows start where a fresh run's rows do: loc 0, sd optim.guide_init_scale
    np.testing.assert_allclose(new[f"{SITE}.loc"][60:90], 0.0, atol=1e-9)
    np.testing.assert_allclose(np.log1p(np.exp(new[f"{SITE}.raw_scale"][60:90])), 0.1, rtol=1e-5)


@pytest.mark.slow
def test_a_continued_row_sparse_run_learns_the_new_rows_and_resumes_exactly(days, tmp_path):
    """Row-sparse: the layout where a known row absent from the new data is never in a
    batch. (Dense carry-over is checked exactly above and across devices below, and
    ``make daily`` trains dense continued runs.)"""
    terms = settings()["model.terms"]
    terms[2] = {**terms[2], "sparse": True}
    first = tmp_path / "day1"
    train(days[0], first, **{"model.terms": terms})
    second = tmp_path / "day2"
    more = {"model.terms": terms, "init_from": str(first), "train.steps": 600}
    train(days[1], second, **more)
    table = level_effects(second)
    values, mean = table["value"].to_pylist(), table["mean"].to_numpy()
    truth = np.array([days[2][v] for v in values])
    new = np.arange(60, 90)
    centred = mean - mean[20:90].mean() + truth[20:90].mean()
    assert np.abs(centred[new] - truth[new]).mean() < 0.1  # learned from day 2 alone
    assert np.corrcoef(mean[new], truth[new])[0, 1] > 0.95

    # the continued run resumes exactly: 300 steps, then on to 600, equals 600 straight
    split = tmp_path / "split"
    train(days[1], split, **{**more, "train.stop_after": 300, "checkpoint.every": 300})
    train(days[1], split, **more)
    a, b = load_params(second), load_params(split)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # scoring knows the new users
    out = tmp_path / "scores"
    proc = run_cli("score", f"run_dir={second}", f"data.path={days[1]}", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.isfinite(pq.read_table(out)["mean"].to_numpy()).all()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["categories"] == {"user": {"known": 90, "new_in_run": 30}}
    users = pq.read_table(days[1], columns=["user"])["user"].to_numpy()
    assert manifest["new_category_rows_by_column"] == {"user": int((users >= "u060").sum())}
    assert manifest["unseen_rows_by_column"] == {"user": 0}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model.link": "student_t"}, "model.link: 'gaussian' → 'student_t'"),
        ({"optim.guide": "conditional"}, "optim.guide: 'mean_field' → 'conditional'"),
        ({"data.numeric": []}, "data.numeric"),
    ],
)
def test_another_model_is_refused_naming_the_setting(days, day1, tmp_path, change, named):
    more = {"init_from": str(day1), "optim.guide": "mean_field", "train.steps": 10, **change}
    if change.get("data.numeric") == []:
        more["model.terms"] = [settings()["model.terms"][0], settings()["model.terms"][2]]
    with pytest.raises(ConfigError, match="init_from=") as err:
        train(days[1], tmp_path / "day2", **more)
    assert named in str(err.value)
    assert not (tmp_path / "day2").exists()  # refused before the data pass wrote anything


def test_a_missing_base_run_is_a_config_error(days, tmp_path):
    with pytest.raises(ConfigError, match=r"init_from=.*nowhere"):
        train(days[1], tmp_path / "day2", **{"init_from": str(tmp_path / "nowhere")})


def test_vocabulary_extension_keeps_ids_and_refuses_an_ordered_column_growing_inside():
    known = Vocab("t", pa.array([3, 1, 2]), np.array([5, 4, 1]))
    new = Vocab("t", pa.array([2, 7, 1, 9]), np.array([6, 3, 2, 1]))
    out = known.extended(new)
    assert out.values.to_pylist() == [3, 1, 2, 7, 9]
    assert out.counts.tolist() == [0, 2, 6, 3, 1] and out.totals.tolist() == [5, 6, 7, 3, 1]
    again = out.extended(Vocab("t", pa.array([9]), np.array([4])))
    assert again.totals.tolist() == [5, 6, 7, 3, 5] and again.inherited == 5
    ordered = Vocab("t", pa.array([1, 2, 3]), np.array([1, 1, 1]))
    assert ordered.extended(Vocab("t", pa.array([3, 4]), np.array([1, 1])), True).size == 4
    with pytest.raises(ValueError, match="only grow at its end"):
        ordered.extended(Vocab("t", pa.array([0, 4]), np.array([1, 1])), ordered=True)
    with pytest.raises(ValueError, match="encode the category the same way"):
        known.extended(Vocab("t", pa.array(["a"]), np.array([1])))


def test_carry_over_copies_known_rows_and_moments_sharded_and_restarts_the_counts():
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from blayers.sharding import make_mesh
    from train.state import TrainState
    from train.warm_start import carry_over

    mesh = make_mesh({"data": 1, "model": -1})
    split = mesh.shape["model"]
    rows_spec, whole = (
        NamedSharding(mesh, PartitionSpec("model")),
        NamedSharding(mesh, PartitionSpec()),
    )
    optimizer = optax.adam(0.1)

    def state(rows: int, fill: float, count: int) -> TrainState:
        params = {"t": {"loc": jnp.full((rows,), fill)}, "g": {"loc": jnp.full((2,), fill)}}
        opt = optimizer.init(params)
        opt = (
            opt[0]._replace(
                count=jnp.asarray(count, jnp.int32),
                mu=jax.tree.map(lambda a: a + fill + 1, opt[0].mu),
                nu=jax.tree.map(lambda a: a + fill + 2, opt[0].nu),
            ),
            *opt[1:],
        )
        return TrainState(jnp.asarray(count, jnp.int32), params, opt, jax.random.PRNGKey(count))

    def shardings(tree: TrainState):
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: rows_spec if "'t'" in jax.tree_util.keystr(path) else whole, tree
        )

    old, fresh = state(split, 5.0, 40), state(2 * split, 0.0, 0)
    old = jax.device_put(old, shardings(old))
    fresh = jax.device_put(fresh, shardings(fresh))
    known = split - 1  # the last old row is the field's unseen-category row: not carried
    out = carry_over(old, fresh, {"t": [(0, 0, known)]}, shardings(old), shardings(fresh))
    loc = np.asarray(out.params["t"]["loc"])
    assert (loc[:known] == 5.0).all() and (loc[known:] == 0.0).all()
    assert (np.asarray(out.params["g"]["loc"]) == 5.0).all()
    adam = out.opt_state[0]
    assert (np.asarray(adam.mu["t"]["loc"])[:known] == 6.0).all()
    assert (np.asarray(adam.mu["t"]["loc"])[known:] == 1.0).all()
    assert (np.asarray(adam.nu["g"]["loc"]) == 7.0).all()
    assert int(adam.count) == 0 and int(out.step) == 0  # the new run counts its own steps
    assert out.params["t"]["loc"].sharding.spec == PartitionSpec("model")

    # a row the new data observes, under a conditional guide, keeps its fresh start
    flags = np.zeros(2 * split, bool)
    flags[[0, known + 1]] = True
    fresh = jax.device_put(state(2 * split, 0.0, 0), shardings(fresh))
    out = carry_over(
        old, fresh, {"t": [(0, 0, known)]}, shardings(old), shardings(fresh), {"t": flags}
    )
    loc = np.asarray(out.params["t"]["loc"])
    assert loc[0] == 0.0 and (loc[1:known] == 5.0).all() and (loc[known:] == 0.0).all()
    assert np.asarray(out.opt_state[0].mu["t"]["loc"])[0] == 1.0  # its moments fresh too


def test_a_run_on_eight_devices_continues_on_two_with_its_tables_split(days, tmp_path):
    first = tmp_path / "day1"
    split = {"mesh.data": 2, "mesh.model": 4, "optim.guide": "mean_field"}
    train(days[0], first, **{**split, "train.steps": 100, "checkpoint.every": 100})
    second = tmp_path / "day2"
    got = run_with_devices(
        2,
        f"""
        import json
        import numpy as np
        from tests.service_helpers import load_params, quiet_config
        from tests.test_warm_start import SITE, settings
        from train import loop
        from train.run import restore_run
        more = {{"mesh.data": 1, "mesh.model": 2, "optim.guide": "mean_field", "optim.lr": 1e-12,
                 "train.steps": 1, "checkpoint.every": 1, "init_from": {str(first)!r}}}
        loop.train(quiet_config({str(days[1])!r}, {str(second)!r}, settings(**more)),
                   log=lambda _: None)
        setup, state, meta = restore_run({str(second)!r}, log=lambda _: None)
        table = state.params[SITE]["loc"]
        new = load_params({str(second)!r})[SITE + ".loc"]
        print(json.dumps({{"rows": int(new.shape[0]), "known": new[:60].ravel().tolist(),
                           "spec": str(table.sharding.spec), "pad": meta["table_pad_multiple"],
                           "init_from": meta["init_from"]}}))
        """,
    )
    old = load_params(first)[f"{SITE}.loc"]
    assert old.shape[0] % 4 == 0 and got["rows"] % 2 == 0 and got["pad"] == 2
    np.testing.assert_allclose(got["known"], old[:60].ravel(), atol=1e-6)
    assert got["spec"] == "P('model',)"  # rows split 2 ways on the new mesh
    assert got["init_from"] == {"run_dir": str(first), "step": 100}
