"""The Python API: the command-line jobs from a notebook, with the same config.

.. code-block:: python

    from .api import Run, fit

    run = fit({"run_dir": "runs/nb", "train.steps": 500})  # or ["train.steps=500", ...]
    run.summary()                # global sites: mean, std, quantiles
    run.effects("user")          # one row per category of a table term
    run.predict(frame)           # a DataFrame, an Arrow table or a Parquet path
    run.metrics()                # the training curve
    run = Run.load("runs/nb")    # later, from the run directory alone

Tables come back as pandas DataFrames where pandas is installed, else as Arrow tables. Bad
input raises the same errors the command line reports in one line (:class:`ConfigError`,
:class:`DataError`, …) before any work is done.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from . import cli, compile_cache, effects, inference_data, score, summary
from . import config as config_lib
from . import run as run_lib
from .config import ConfigError
from .frames import as_arrow, as_frame

Settings = Mapping[str, Any] | Sequence[str] | DictConfig | None


def config(settings: Settings = None, name: str = "config") -> DictConfig:
    """The composed, checked config of job ``name`` (``config``, ``score``, ``summary``,
    ``effects``): the shipped defaults plus ``settings`` as Hydra override strings
    (``["optim.lr=0.02"]``, groups included: ``"optim=adagrad"``) or dotted keys
    (``{"optim.lr": 0.02}``). A composed config is checked and passed through."""
    schema = {
        "config": config_lib.Config,
        "score": config_lib.ScoreConfig,
        "summary": config_lib.SummaryConfig,
        "effects": config_lib.EffectsConfig,
    }[name]
    if isinstance(settings, DictConfig):
        return config_lib.from_container(settings, schema)
    if isinstance(settings, str):
        raise ConfigError("settings: give a list of overrides or a dict, not one string")
    overrides = [] if settings is None or isinstance(settings, Mapping) else list(settings)
    try:
        with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3"):
            composed = compose(config_name=name, overrides=overrides)
    except HydraException as err:  # an unknown key or group, a malformed override
        raise ConfigError(f"settings: {str(err).strip().splitlines()[0]}") from None
    data = OmegaConf.to_container(composed, resolve=False)
    data.pop("hydra", None)
    merged = OmegaConf.create(data)
    for key, value in (settings or {}).items() if isinstance(settings, Mapping) else ():
        if OmegaConf.select(merged, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"config key {key!r}: not a key of the {name} job")
        OmegaConf.update(merged, key, value, merge=False)
    return config_lib.from_container(merged, schema)


_MISSING = object()


def fit(settings: Settings = None) -> Run:
    """Train (or resume) the job ``settings`` describe (see :func:`config`); the trained
    :class:`Run`. Turns on the persistent compilation cache as the commands do
    (:mod:`train.compile_cache`), unless JAX already has one."""
    cfg = config(settings)
    compile_cache.enable()
    cli.run_train(cfg)
    return Run(Path(cfg.run_dir))


class Run:
    """A trained run, read from its directory: its checkpoint is restored once, on first use."""

    def __init__(self, run_dir: str | Path, trust_model: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.trust_model = trust_model
        self._restored: tuple[Any, Any, dict[str, Any]] | None = None

    @classmethod
    def load(cls, run_dir: str | Path, trust_model: str | None = None) -> Run:
        """The run in ``run_dir``; ``trust_model`` as for ``blayers-summary``."""
        run = cls(run_dir, trust_model)
        if not (run.run_dir / "checkpoints").is_dir():
            raise FileNotFoundError(
                f"run_dir={str(run_dir)!r} holds no trained run (no checkpoints/)"
            )
        return run

    def restored(self) -> tuple[Any, Any, dict[str, Any]]:
        """``(setup, state, metadata)`` of the latest good checkpoint."""
        if self._restored is None:
            self._restored = run_lib.restore_run(
                self.run_dir, log=lambda _: None, trust_model=self.trust_model
            )
        return self._restored

    @property
    def step(self) -> int:
        """The restored checkpoint's step."""
        return int(self.restored()[2]["step"])

    def summary(self, draws: int = 1000, seed: int = 0) -> Any:
        """The global sites' posterior: one row per element (``blayers-summary``)."""
        setup, state, _ = self.restored()
        return as_frame(pa.Table.from_pylist(summary.summary_rows(setup, state, draws, seed)))

    def effects(
        self, term: str, quantiles: Sequence[float] = effects.QUANTILES, chunk_rows: int = 1 << 18
    ) -> Any:
        """Each category's posterior effect in table term ``term`` (``blayers-effects``)."""
        setup, state, _ = self.restored()
        batches = effects.effect_batches(
            setup, state, self.run_dir / "vocab", term, quantiles, chunk_rows
        )
        return as_frame(pa.Table.from_batches(list(batches)))

    def predict(self, data: Any, **settings: Any) -> Any:
        """Posterior predictive scores of ``data`` (a Parquet path, an Arrow table or a
        DataFrame), one row per input row in order; ``settings``: ``blayers-score`` keys
        (``draws=200``, ``quantiles=[0.1, 0.9]``, ``linear_predictor=True``, ...)."""
        with tempfile.TemporaryDirectory(prefix="blayers-predict-") as tmp:
            if isinstance(data, (str, Path)):
                path = Path(data)
            else:
                path = Path(tmp) / "input.parquet"
                pq.write_table(as_arrow(data), path)
            keys = {
                "run_dir": str(self.run_dir),
                "trust_model": self.trust_model,
                "output": str(Path(tmp) / "scores"),
                "data.path": str(path),
                **settings,
            }
            cfg = config(keys, "score")
            score.score(cfg, log=lambda _: None)
            parts = sorted((Path(tmp) / "scores").glob("part-*.parquet"))
            table = pa.concat_tables([pq.read_table(p) for p in parts])
        return as_frame(table.replace_schema_metadata(None))

    def to_arviz(
        self,
        draws: int = 500,
        seed: int = 0,
        rows: Mapping[str, Sequence[Any]] | None = None,
        data: Any = None,
        max_rows: int = inference_data.MAX_ROWS,
    ) -> Any:
        """An ArviZ ``InferenceData``: posterior draws of the global sites and of the table
        rows named in ``rows`` (``{"user": [raw values]}``); given ``data`` (a path, an Arrow
        table or a DataFrame of at most ``max_rows`` rows), also ``posterior_predictive``,
        ``log_likelihood`` and ``observed_data`` (:mod:`train.inference_data`)."""
        setup, state, meta = self.restored()
        target = meta.get("config", {}).get("data", {}).get("target")
        return inference_data.to_arviz(
            setup, state, self.run_dir / "vocab", draws, seed, rows, data, max_rows, target
        )

    def metrics(self) -> Any:
        """The training curve: one row per logged step (``metrics.jsonl``)."""
        path = self.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return as_frame(pa.Table.from_pylist(rows))
