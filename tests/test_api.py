"""The Python API (train.api): the command-line jobs from a notebook, same config, same
results; the README's example runs as written."""

from __future__ import annotations

import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_array_equal

from tests.service_helpers import REPO, SMALL_TERMS, small_dataset
from train import api, score
from train.config import ConfigError
from train.summary import summarize

pd = pytest.importorskip("pandas")  # a dev dependency: both return types are tested here


def settings(data, run_dir, **extra):
    return {
        "run_dir": str(run_dir),
        "data.path": str(data),
        "data.batch_size": 64,
        "data.shuffle_block": 8,
        "model.terms": SMALL_TERMS,
        "train.steps": 20,
        "train.log_every": 5,
        "train.progress": False,
        "checkpoint.every": 10,
        "checkpoint.async_save": False,
        **extra,
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    return api.fit(settings(dataset, tmp_path_factory.mktemp("fit") / "run"))


def test_fit_trains_the_configured_job(run):
    assert run.step == 20
    assert (run.run_dir / "checkpoints" / "20").is_dir()
    metrics = run.metrics()
    assert list(metrics["step"]) == [5, 10, 15, 20]


def test_overrides_as_strings_and_as_dotted_keys_give_one_config():
    as_dict = api.config({"optim.lr": 0.02})
    as_list = api.config(["optim.lr=0.02"])
    assert as_dict == as_list
    assert api.config(["optim=adagrad"]).optim.name == "adagrad"


def test_summary_is_the_cli_summary(run):
    got = run.summary(draws=300, seed=3)
    want = summarize(run.run_dir, draws=300, seed=3)
    assert list(got["site"]) == [r["site"] for r in want]
    assert_array_equal(got["mean"].to_numpy(), [r["mean"] for r in want])


def test_predict_on_a_dataframe_equals_blayers_score_on_the_file(run, dataset, tmp_path):
    frame = pq.read_table(dataset).slice(0, 300).to_pandas()
    got = run.predict(frame, draws=30, seed=1)
    assert isinstance(got, pd.DataFrame) and len(got) == 300
    part = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), part)
    cfg = api.config(
        {
            "run_dir": str(run.run_dir),
            "data.path": str(part),
            "output": str(tmp_path / "out"),
            "draws": 30,
            "seed": 1,
        },
        "score",
    )
    score.score(cfg, log=lambda _: None)
    want = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))[0]).to_pandas()
    assert_array_equal(got["mean"].to_numpy(), want["mean"].to_numpy())
    assert_array_equal(got["row_id"].to_numpy(), frame["row_id"].to_numpy())
    assert not list(tmp_path.glob("blayers-predict-*"))


def test_without_pandas_arrow_tables_come_back(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now fails
    assert isinstance(run.summary(draws=50), pa.Table)
    assert isinstance(run.effects("region"), pa.Table)


def test_load_reads_the_run_from_its_directory_alone(run):
    again = api.Run.load(run.run_dir)
    effects = again.effects("user")
    assert len(effects) == again.restored()[0].model.terms[2].num_categories[0] - 1


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"optim.lrr": 0.1}, "optim.lrr"),
        (["optim.lrr=0.1"], "optim.lrr"),
        (["optim=adamm"], "adamm"),
        ({"train.steps": "many"}, "train.steps"),
        ("train.steps=5", "not one string"),
    ],
)
def test_bad_settings_raise_naming_the_key(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        api.config(bad)


def test_load_of_a_folder_without_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained run"):
        api.Run.load(tmp_path)


def test_predict_refuses_what_is_not_data(run):
    with pytest.raises(ConfigError, match="Parquet path"):
        run.predict([1, 2, 3])


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md has no api-example block"
    monkeypatch.chdir(tmp_path)  # its data and run land in a scratch folder
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "notebook" / "checkpoints").is_dir()
    effects = namespace["effects"]
    assert {"value", "count", "mean", "sd", "q05", "q95"} <= set(effects.columns)
    assert np.all(effects["q05"] <= effects["q95"])
