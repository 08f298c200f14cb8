"""Several steps per dispatch (train.dispatch): the plan against a brute-force walk, the
skip tally against a step-by-step count, and runs that equal one step per dispatch bit for bit."""

from __future__ import annotations

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.service_helpers import SMALL_TERMS, load_params, small_config, small_dataset
from train import dispatch, loop
from train.dedup import COUNT, LOCAL, UNIQ, TableRows, host_rows, pad_rows
from train.nonfinite import SkipCount


@pytest.mark.parametrize(
    ("requested", "periods", "expected"),
    [
        (10, (50, 500, 10, 250), 10),
        (8, (50, 1000, 10), 5),  # the largest divisor of 10 not above 8
        (10, (5, 10, 10), 5),
        (10, (7,), 7),
        (10, (0, 0), 10),  # a period of 0 never acts
        (1, (50,), 1),
        (16, (12, 18), 6),
    ],
)
def test_group_size_is_the_largest_common_divisor_not_above_the_request(
    requested, periods, expected
):
    assert dispatch.group_size(requested, periods) == expected


def _brute_units(first, stop, k):
    """Walk step by step: a K-step dispatch starts at a multiple of k and fits below stop;
    anything else is one step."""
    out, s = [], first
    while s < stop:
        if k > 1 and s % k == 0 and s + k <= stop:
            out.append((s, k))
            s += k
        else:
            out.append((s, 1))
            s += 1
    return out


@settings(max_examples=300, deadline=None)
@given(first=st.integers(0, 60), span=st.integers(0, 80), k=st.integers(1, 12))
def test_units_equal_a_step_by_step_walk(first, span, k):
    plan = dispatch.units(first, first + span, k)
    assert [plan[i] for i in range(len(plan))] == _brute_units(first, first + span, k)
    with pytest.raises(IndexError):
        plan[len(plan)]


@settings(max_examples=200, deadline=None)
@given(
    losses=st.lists(st.sampled_from([1.0, np.nan, np.inf, 2.0]), min_size=1, max_size=30),
    cuts=st.lists(st.integers(1, 29), max_size=6),
)
def test_the_skip_tally_of_whole_dispatches_equals_a_step_by_step_count(losses, cuts):
    bounds = sorted({0, len(losses), *(c for c in cuts if c < len(losses))})
    grouped = SkipCount()
    for a, b in itertools.pairwise(bounds):
        chunk = jnp.asarray(losses[a:b], jnp.float32)
        grouped.add(chunk if b - a > 1 or a % 2 else chunk[0])  # scalars and vectors alike
    streak = total = 0
    for loss in losses:
        skipped = not np.isfinite(loss)
        streak, total = (streak + 1 if skipped else 0), total + skipped
    assert grouped.read() == (streak, total)


def test_padded_row_arrays_stay_sorted_distinct_past_the_table_and_uncounted():
    rng = np.random.default_rng(0)
    table = TableRows("re", (0,), (0,), 1000)
    batches = [
        host_rows(rng.integers(0, n, (512, 1)).astype(np.int32), [table]) for n in (5, 100, 900)
    ]
    lengths = [len(b[UNIQ + "re"]) for b in batches]
    assert len(set(lengths)) > 1  # the case: different lengths to even out
    padded = pad_rows(batches, [table])
    for before, after in zip(batches, padded, strict=True):
        uniq, counts = after[UNIQ + "re"], after[COUNT + "re"]
        assert len(uniq) == max(lengths)
        n = len(before[UNIQ + "re"])
        np.testing.assert_array_equal(uniq[:n], before[UNIQ + "re"])
        np.testing.assert_array_equal(counts[:n], before[COUNT + "re"])
        assert (np.diff(uniq) > 0).all() and (uniq[n:] >= 1000).all() and (counts[n:] == 0).all()
        np.testing.assert_array_equal(after[LOCAL + "re"], before[LOCAL + "re"])
    stacked = dispatch.stack(padded)
    assert isinstance(stacked, dispatch.Stacked)
    assert stacked[UNIQ + "re"].shape == (3, max(lengths))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("dispatch"))


SPARSE_TERMS = [
    {**t, "sparse": True} if t["layer"] == "RandomEffectsLayer" else t for t in SMALL_TERMS
]


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _assert_params(run_dir, reference, exact=True):
    got = load_params(run_dir)
    assert got.keys() == reference.keys()
    for key in reference:
        if exact:
            np.testing.assert_array_equal(got[key], reference[key], err_msg=f"{run_dir}: {key}")
        else:
            np.testing.assert_allclose(got[key], reference[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "row-sparse"])
def test_ten_steps_per_dispatch_train_the_bits_of_one_on_eight_devices(data, tmp_path, sparse):
    terms = {"model.terms": SPARSE_TERMS} if sparse else {}
    common = {**terms, "train.steps": 30, "train.log_every": 10, "train.steps_per_dispatch": 10}
    one = {"train.steps_per_dispatch": 1}
    loop.train(small_config(data, tmp_path / "one", **{**common, **one}), log=lambda _: None)
    many = small_config(data, tmp_path / "many", **common)
    assert many.train.steps_per_dispatch == 10
    loop.train(many, log=lambda _: None)
    _assert_params(tmp_path / "many", load_params(tmp_path / "one"))
    assert _losses(tmp_path / "many") == _losses(tmp_path / "one")
    assert [s for s, _ in _losses(tmp_path / "many")] == [10, 20, 30]
    if not sparse:
        return
    # a run of 15 steps (5 per dispatch) continued to 30 (10 per dispatch): single steps
    # from 15 to 20, then one dispatch of 10; against the same two runs one step at a time
    for name, per in (("continued", {}), ("continued-one", one)):
        short = {**common, "train.steps": 15, **per}
        loop.train(small_config(data, tmp_path / name, **short), log=lambda _: None)
        loop.train(small_config(data, tmp_path / name, **{**common, **per}), log=lambda _: None)
    _assert_params(tmp_path / "continued", load_params(tmp_path / "continued-one"))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "row-sparse"])
def test_on_one_device_a_stop_lands_on_a_dispatch_and_the_resume_is_exact(data, tmp_path, sparse):
    # on one device XLA may round a scanned step's arithmetic differently in the last bit
    # (train.dispatch), so the run that stops (at the end of the dispatch that reaches
    # stop_after) and resumes must dispatch its steps as the straight run does: bit-exact
    terms = {"model.terms": SPARSE_TERMS} if sparse else {}
    common = {**terms, "train.steps": 30, "train.log_every": 10, "mesh.data": 1}
    common |= {"train.steps_per_dispatch": 10}
    loop.train(small_config(data, tmp_path / "straight", **common), log=lambda _: None)
    stopped = small_config(data, tmp_path / "stopped", **common, **{"train.stop_after": 7})
    messages: list[str] = []
    assert loop.train(stopped, log=messages.append)["stopped_early"]
    assert any("stopping at step 10 of 30" in m for m in messages)
    loop.train(small_config(data, tmp_path / "stopped", **common), log=lambda _: None)
    straight = load_params(tmp_path / "straight")
    _assert_params(tmp_path / "stopped", straight)
    # one step per dispatch: the same posterior to float rounding
    one = small_config(data, tmp_path / "one", **{**common, "train.steps_per_dispatch": 1})
    loop.train(one, log=lambda _: None)
    _assert_params(tmp_path / "one", straight, exact=False)


def test_the_run_takes_the_steps_per_dispatch_that_every_hook_period_allows(
    data, tmp_path, monkeypatch
):
    # each hook names its periods (train.hooks); the run's K divides them all, so logs,
    # convergence samples and checkpoints still land on their own steps
    chosen: list[tuple[list[int], int]] = []
    group_size = dispatch.group_size

    def spy(requested, periods):
        periods = list(periods)
        chosen.append((periods, group_size(requested, periods)))
        return chosen[-1][1]

    monkeypatch.setattr(dispatch, "group_size", spy)
    settings = {
        "train.steps": 36,
        "train.log_every": 12,
        "checkpoint.every": 9,
        "train.convergence.sample_every": 6,
        "optim.recenter_every": 0,
    }
    loop.train(small_config(data, tmp_path / "run", **settings), log=lambda _: None)
    [(periods, k)] = chosen
    assert {36, 12, 9, 6} <= set(periods)
    assert k == 3
    assert [s for s, _ in _losses(tmp_path / "run")] == [12, 24, 36]
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == [18, 27, 36]  # every 9 steps, the last three kept
