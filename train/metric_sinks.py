"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard and MLflow, each opt-in
(``train.metrics``) and each an optional extra.

- **TensorBoard** (``tensorboardX``): one scalar per metric and logged step in event files
  under ``<run_dir>/tensorboard``; ``tensorboard --logdir <run_dir>/tensorboard``.
- **MLflow**: one MLflow run per service run. Its id is kept in ``<run_dir>/mlflow.json``, so
  a resumed run (or ``blayers-report``) logs into the same MLflow run. Params: the resolved
  config, flattened, logged when the MLflow run is created. Metrics: every logged step.
  Artifacts: ``config.yaml`` and ``run.json`` at the end of training; ``report.html`` and
  ``summary.csv`` when ``blayers-report`` runs. The tracking location is
  ``train.metrics.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store
  ``<run_dir>/mlflow.db`` with artifacts in ``<run_dir>/mlartifacts``: never the folder the
  job was started from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from . import files
from .config import Config, ConfigError

MLFLOW_RUN = "mlflow.json"
NOT_SCALARS = ("step", "time")


class Sink(Protocol):
    def write(self, step: int, record: Mapping[str, Any]) -> None:
        """One logged step's metrics."""

    def close(self, run_dir: Path) -> None:
        """The end of training (artifacts, flushing)."""


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k not in NOT_SCALARS and isinstance(v, (int, float)) and v == v  # NaN: skipped
    }


class TensorBoard:
    """Scalars into ``<run_dir>/tensorboard`` event files."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.metrics.tensorboard=true needs tensorboardX: "
                "pip install 'blayers[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(logdir=str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        for name, value in _scalars(record).items():
            self.writer.add_scalar(name, value, step)

    def close(self, run_dir: Path) -> None:
        self.writer.close()


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ConfigError(
            "train.metrics.mlflow=true needs MLflow: pip install 'blayers[mlflow]'"
        ) from None
    return mlflow


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


def tracking_uri(run_dir: Path, configured: str | None) -> str:
    """Where MLflow records: the configured URI, ``MLFLOW_TRACKING_URI``, else a SQLite
    store in the run directory (MLflow's file store is deprecated)."""
    return (
        configured
        or os.environ.get("MLFLOW_TRACKING_URI")
        or (f"sqlite:///{(Path(run_dir).absolute() / 'mlflow.db')}")
    )


class MLflow:
    """One MLflow run per service run, resumed by the id kept in ``<run_dir>/mlflow.json``."""

    def __init__(
        self, run_dir: Path, config: Mapping[str, Any], uri: str | None, experiment: str
    ) -> None:
        mlflow = _import_mlflow()
        self.mlflow = mlflow
        self.client = mlflow.tracking.MlflowClient(tracking_uri(run_dir, uri))
        kept = Path(run_dir) / MLFLOW_RUN
        known = json.loads(kept.read_text()) if kept.is_file() else {}
        if known.get("run_id"):
            self.run_id = known["run_id"]
            return
        found = self.client.get_experiment_by_name(experiment)
        # artifacts beside the run, not MLflow's default ./mlruns in the working folder
        artifacts = (Path(run_dir).absolute() / "mlartifacts").as_uri()
        experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(experiment, artifact_location=artifacts)
        )
        run = self.client.create_run(experiment_id, run_name=Path(run_dir).name)
        self.run_id = run.info.run_id
        params = list(_flat(config).items())
        for lo in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(
                self.run_id,
                params=[mlflow.entities.Param(k, v[:6000]) for k, v in params[lo : lo + 100]],
            )
        files.write_text(
            kept,
            json.dumps({"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}),
        )

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        stamp = int(float(record.get("time", 0)) * 1000)
        metrics = [
            self.mlflow.entities.Metric(k, v, stamp, step) for k, v in _scalars(record).items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, run_dir: Path) -> None:
        for name in ("config.yaml", "run.json"):
            if (Path(run_dir) / name).is_file():
                self.client.log_artifact(self.run_id, str(Path(run_dir) / name))


def open_sinks(cfg: Config, run_dir: Path, config: Mapping[str, Any]) -> list[Sink]:
    """The sinks ``train.metrics`` turns on (checked before any step: a missing library is a
    one-line error naming the key and the extra to install)."""
    sinks: list[Sink] = []
    metrics = cfg.train.metrics
    if metrics.tensorboard:
        sinks.append(TensorBoard(run_dir))
    if metrics.mlflow:
        uri, experiment = metrics.mlflow_tracking_uri, metrics.mlflow_experiment
        sinks.append(MLflow(run_dir, config, uri, experiment))
    return sinks


def log_report(run_dir: Path) -> bool:
    """``report.html`` and ``summary.csv`` as artifacts of the run's MLflow run, if it has
    one; whether it did."""
    kept = Path(run_dir) / MLFLOW_RUN
    if not kept.is_file():
        return False
    known = json.loads(kept.read_text())
    client = _import_mlflow().tracking.MlflowClient(known["tracking_uri"])
    for name in ("report.html", "summary.csv"):
        if (Path(run_dir) / name).is_file():
            client.log_artifact(known["run_id"], str(Path(run_dir) / name))
    return True
