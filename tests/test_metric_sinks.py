"""Metrics beyond metrics.jsonl (train.metric_sinks): TensorBoard event files and MLflow,
each holding what metrics.jsonl holds; a sink whose library is missing is refused first."""

from __future__ import annotations

import json
import struct

import pytest

from tests.service_helpers import small_config, small_dataset
from train import loop, report
from train.config import ConfigError


def read_events(directory):
    """(tag, step, value) of every scalar in a directory's TFRecord event files."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.append((value.tag, event.step, value.simple_value))
    return out


def jsonl(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("data"))


def test_tensorboard_events_hold_the_logged_metrics(dataset, tmp_path):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    cfg = small_config(dataset, run, **{"train.metrics.tensorboard": True})
    loop.train(cfg, log=lambda _: None)
    events = read_events(run / "tensorboard")
    for record in jsonl(run):
        for tag in ("elbo_per_row", "loss", "examples_per_s", "input_wait"):
            got = [v for t, s, v in events if t == tag and s == record["step"]]
            assert got == [pytest.approx(record[tag], rel=1e-6)], (tag, record["step"])


# MLflow's own use of SQLAlchemy and its other dependencies warns of their deprecations
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_mlflow_run_holds_params_metrics_and_artifacts_and_resumes(dataset, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")  # the default store is SQLite in the run directory
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)  # nothing may land in the folder the job runs from
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    settings = {"train.metrics.mlflow": True, "train.steps": 10}
    loop.train(small_config(dataset, run, **settings), log=lambda _: None)
    kept = json.loads((run / "mlflow.json").read_text())
    assert kept["tracking_uri"] == f"sqlite:///{run.absolute() / 'mlflow.db'}"
    loop.train(small_config(dataset, run, **{**settings, "train.steps": 20}), log=lambda _: None)
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == kept["run_id"]
    client = mlflow.tracking.MlflowClient(kept["tracking_uri"])
    got = client.get_run(kept["run_id"])
    assert got.data.params["optim.lr"] == "0.01" and got.data.params["train.steps"] == "10"
    history = client.get_metric_history(kept["run_id"], "elbo_per_row")
    want = {r["step"]: r["elbo_per_row"] for r in jsonl(run)}
    assert {m.step: m.value for m in history} == pytest.approx(want)
    (run / "summary.csv").write_text("site,index,label,mean,std,q05,q50,q95\n")
    report.build(run)
    from train import metric_sinks

    assert metric_sinks.log_report(run)
    names = {a.path for a in client.list_artifacts(kept["run_id"])}
    assert {"config.yaml", "run.json", "report.html", "summary.csv"} <= names
    assert (run / "mlartifacts").is_dir() and list(here.iterdir()) == []


@pytest.mark.parametrize("key", ["tensorboard", "mlflow"])
def test_a_sink_without_its_library_is_refused_before_any_work(dataset, tmp_path, key, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboardX", "mlflow") else real(name, *a),
    )
    with pytest.raises(ConfigError, match=f"train.metrics.{key}=true needs"):
        loop.train(small_config(dataset, tmp_path / "run", **{f"train.metrics.{key}": True}))
    assert not (tmp_path / "run" / "checkpoints").exists()
