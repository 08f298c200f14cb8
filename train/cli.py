"""Command-line entry points: ``blayers-train``, ``blayers-summary``, ``blayers-score``,
``blayers-effects`` (Hydra)."""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from blayers.sharding import ShardingError

from . import compile_cache, late_reads
from . import config as config_lib
from . import run as run_lib
from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .rundir import RunDirBusyError
from .state import NonFiniteError

_HERE = Path(__file__).resolve().parent
# installed (blayers.train), the default configs ship inside the package; in the repo they
# are its top-level configs/
CONFIG_DIR = os.environ.get(
    "BLAYERS_CONFIG_DIR",
    str(_HERE / "configs" if (_HERE / "configs").is_dir() else _HERE.parent / "configs"),
)
USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    ShardingError,
    FileNotFoundError,
    NonFiniteError,
    RunDirBusyError,
)

# storage the user must fix (space, quota, permissions, a read-only disk); writes are atomic
# (train.files), so what was written before is intact
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

config_lib.register()
config_lib.register_tools()


def _exit(code: int) -> None:
    """Exit with ``code``. After a failed checkpoint read, skip the interpreter's shutdown:
    TensorStore's reads still in flight would print tracebacks there, after the one line. By
    then every output is written and closed (all writes are synchronous and atomic; training
    waits for its checkpoints before returning)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if late_reads.restore_failed():
        os._exit(code)
    sys.exit(code)


def _friendly(fn: Callable[[DictConfig], Any], schema: type) -> Callable[[DictConfig], Any]:
    """Re-check the composed config against ``schema``, then run; bad input → one clear line
    on stderr and exit status 2, not a traceback."""

    def run(cfg: DictConfig) -> Any:
        # Hydra's logging config sets the root to INFO; checkpoint libraries chat there
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("absl", "orbax", "jax"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            checked = config_lib.from_container(cfg, schema)
            compile_cache.enable()
            result = fn(checked)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            _exit(2)
        except OSError as err:
            if err.errno not in STORAGE_ERRNOS:
                raise
            where = f" {err.filename}" if err.filename else ""
            print(
                f"error: cannot write{where}: {err.strerror}; fix it and rerun: a run resumes "
                "from its last checkpoint and scoring redoes only unfinished parts",
                file=sys.stderr,
            )
            _exit(2)
        if late_reads.restore_failed():
            _exit(0)
        return result

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def run_train(cfg: DictConfig) -> dict[str, Any]:
    from . import loop, synth

    path = Path(cfg.data.path)
    # only the shipped default path is ever generated: a mistyped or missing path of the
    # user's is an error naming it (train.data.parquet_files), and nothing is written there
    if cfg.data.generate_default and path == Path(synth.DEFAULT_PATH) and not path.exists():
        print(f"generating the default dataset ({cfg.data.default_rows:,} rows) at {path}")
        synth.generate(path, cfg.data.default_rows)
    result = loop.train(cfg)
    if not cfg.dry_run:
        print(
            f"trained to step {result['step']}; checkpoint: {result['checkpoint']}; "
            f"metrics: {result['metrics']}"
        )
    return result


def run_summary(cfg: DictConfig) -> list[dict[str, Any]]:
    from . import summary

    rows = summary.summarize(
        Path(cfg.run_dir), cfg.step, cfg.draws, cfg.seed, cfg.strict, trust_model=cfg.trust_model
    )
    out = Path(cfg.run_dir) / "summary.csv"
    summary.write_csv(rows, out)
    print(summary.format_rows(rows))
    print(f"wrote {out}")
    return rows


def run_effects(cfg: DictConfig) -> Path:
    from . import effects

    out = Path(cfg.output or Path(cfg.run_dir) / "effects" / f"{cfg.term}.parquet")
    setup, state, _ = run_lib.restore_run(
        Path(cfg.run_dir), cfg.step, cfg.strict, trust_model=cfg.trust_model
    )
    batches = effects.effect_batches(
        setup, state, Path(cfg.run_dir) / "vocab", cfg.term, cfg.quantiles, cfg.chunk_rows
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = effects.write(batches, out)
    print(f"wrote {rows:,} rows of term {cfg.term!r} to {out}")
    return out


def run_score(cfg: DictConfig) -> dict[str, Any]:
    from . import score

    return score.score(cfg)


def sweep_job_dir(run_dir: str, job_overrides: list[str], argv: list[str]) -> str:
    """A multirun job's own run directory: ``run_dir`` joined with the values this job takes
    of the keys the command line sweeps (``optim.lr=0.01,0.05`` → ``<run_dir>/optim.lr=0.01``),
    so jobs never share a run, and rerunning the same sweep with more steps resumes each."""
    parser = OverridesParser.create()
    given = [a for a in argv if "=" in a and not a.startswith("-")]
    swept = {o.key_or_group for o in parser.parse_overrides(given) if o.is_sweep_override()}
    mine = [o for o in parser.parse_overrides(job_overrides) if o.key_or_group in swept]
    name = ",".join(f"{o.key_or_group}={o.value()}" for o in mine).replace("/", "_")
    return str(Path(run_dir) / (name or "job"))


def _per_job(cfg: DictConfig) -> DictConfig:
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return cfg
    run_dir = sweep_job_dir(cfg.run_dir, list(hc.overrides.task), sys.argv[1:])
    with open_dict(cfg):
        cfg.run_dir = run_dir
    return cfg


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def train_main(cfg: DictConfig) -> None:
    """Train (or resume) a model described by the config."""
    _friendly(run_train, config_lib.Config)(_per_job(cfg))


@hydra.main(config_path=CONFIG_DIR, config_name="summary", version_base="1.3")
def summary_main(cfg: DictConfig) -> None:
    """Print and write summary.csv for a run's global latent sites."""
    _friendly(run_summary, config_lib.SummaryConfig)(cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="score", version_base="1.3")
def score_main(cfg: DictConfig) -> None:
    """Score a Parquet dataset with a trained run's posterior; write Parquet parts."""
    _friendly(run_score, config_lib.ScoreConfig)(cfg)


@hydra.main(config_path=CONFIG_DIR, config_name="effects", version_base="1.3")
def effects_main(cfg: DictConfig) -> None:
    """Write a table term's per-level posterior effects (one row per category) as Parquet."""
    _friendly(run_effects, config_lib.EffectsConfig)(cfg)
