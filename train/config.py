"""Typed configuration: dataclasses registered in Hydra's ConfigStore.

Structured configs make Hydra reject unknown keys and wrong types at load time, naming the key.
``model.terms`` is free-form (each term carries its layer's own kwargs) and is validated against
the layer signatures when the model is built (``train.model``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from blayers.sharding import DEFAULT_RULES


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclass
class DataConfig:
    path: str = "data/default/train.parquet"  # Parquet file, directory of Parquet files, or glob
    target: str = "y"
    numeric: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    batch_size: int = 4096
    prefetch: int = 2  # batches prepared ahead by background threads
    # CPU backend, one process: pipeline threads on cores of their own, XLA's pool on the rest.
    # Pays off when a step is as cheap as a batch is to prepare (see train/cores.py)
    dedicated_cores: bool = False
    # rows per contiguous block of the (once-shuffled) store; 1 = per-row shuffle each epoch
    shuffle_block: int = 256
    # write the embedded default dataset if `path` is its shipped path (train.synth) and missing
    generate_default: bool = False
    default_rows: int = 1_000_000


@dataclass
class ModelConfig:
    _target_: str | None = None  # a user model: "package.module.function"
    link: str = "gaussian"
    link_kwargs: dict[str, Any] = field(default_factory=dict)
    terms: list[Any] = field(default_factory=list)
    # categorical FM factors of one unit stored (rows, rank), not (rows, rank, 1): the same
    # numbers, and XLA:CPU vectorizes their draws and updates (blayers CategoricalFMLayer's
    # unit_axis); runs saved before keep the unit axis
    fm_unit_axis: bool = False


def default_mesh() -> dict[str, int]:
    """Mesh axis -> size; -1: all devices the other axes leave. ``data`` splits the batch
    and ``model`` the tables, by the rules below; another axis is one more key and a rule
    that uses it (``train.plan``)."""
    return {"data": -1, "model": 1}


@dataclass
class ShardingConfig:
    # logical axis -> mesh axis (or null); the first rule whose mesh axes are free wins
    rules: list[Any] = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd | adagrad
    lr: float = 0.01
    schedule: str = "cosine"  # constant | cosine
    warmup_steps: int = 0
    end_lr_factor: float = 0.05  # cosine decays to lr * end_lr_factor
    clip_norm: float | None = None
    guide_init_scale: float = 0.1
    # the structured guide's coupling of the globals learns at lr times this (train.state)
    coupling_lr_factor: float = 0.03
    # conditional: structured, with each Normal-prior table's rows their prior given the
    # drawn scale times a learned Gaussian site (blayers.guides.ConditionalGuide);
    # structured: a joint Normal over the globals with tables' rows linear in them
    # (blayers.guides.StructuredGuide); mean_field: independent Normals per element
    guide: str = "conditional"
    # how a conditional guide draws categorical-FM factors (train/guide_plan.py): free, a
    # Normal of their own; site, conditioned on the FM's scale like random-effect rows
    fm_rows: str = "free"
    # data: the intercept at the link of the target's mean and the link's globals at their
    # moment estimates (blayers.start); zero: every guide loc at 0 (the prior's centre)
    start: str = "data"
    # every this many steps, move each table's row mean into the intercept where that raises
    # the ELBO (exact: the likelihood is unchanged; train/recenter.py). 0: never
    recenter_every: int = 50
    # each step's ELBO at a draw and its mirror image (blayers.guides.antithetic_mean): twice
    # the model's work per step, and the noise that drags a weakly identified table's scale
    # down (one to three binary rows per level) cancels. false: a fresh run names each scaled
    # table whose levels mostly have one or two rows (train.starts.one_draw_warnings)
    antithetic: bool = True
    # horizon of the cosine schedule; None: train.steps. Fix it before extending a run's total
    # if the extended run must follow the same learning-rate curve.
    decay_steps: int | None = None


@dataclass
class ConvergenceConfig:
    """How a run judges convergence (train/convergence.py)."""

    sample_every: int = 10  # steps between samples of the loss and the global sites
    window: int | None = None  # steps per window; None: one epoch
    drift_tol: float = 0.1  # posterior sds per epoch a global may still move
    elbo_tol: float = 0.001  # nats per row per epoch the ELBO may still rise
    patience: int = 2  # settled windows in a row


@dataclass
class NonFiniteConfig:
    """What a run does when its loss or state stops being finite (train/nonfinite.py)."""

    # stop: name the step and the first non-finite site, save nothing non-finite (a rerun
    # resumes from the last good step); skip: a step whose loss or gradient is not finite
    # changes nothing; rollback: back to the last good checkpoint with a lower learning rate
    policy: str = "stop"
    max_skipped: int = 20  # skip: this many skipped steps in a row stop the run
    lr_factor: float = 0.5  # rollback: the learning rate is multiplied by this each time
    max_rollbacks: int = 3  # rollback: after this many the run stops


@dataclass
class MetricsConfig:
    # TensorBoard event files in <run_dir>/tensorboard (pip install 'blayers[tensorboard]')
    tensorboard: bool = False
    # MLflow: params, metrics, and the run's files as artifacts (pip install 'blayers[mlflow]')
    mlflow: bool = False
    # default: MLFLOW_TRACKING_URI when set, else sqlite in <run_dir> (never the working folder)
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "blayers"


@dataclass
class TrainLoopConfig:
    steps: int = 2000  # total steps of the run (the cap with until: converged)
    # steps: run train.steps; converged: stop once the ELBO and every global have settled
    until: str = "steps"
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    seed: int = 0
    log_every: int = 50
    # steps per dispatch of the compiled step (a scan over stacked batches, train/dispatch.py):
    # at most this many, the largest that divides train.steps, log_every, checkpoint.every and
    # the other cadences. Less host work per step: fed end to end on 2 cores at 10^6 rows,
    # random effects 0.61x -> 0.92x of step-only, embedding 0.87x -> 1.07x, FM 0.84x -> 0.98x
    steps_per_dispatch: int = 10
    progress: bool = True
    # stop (checkpoint, exit cleanly) after this many steps of this invocation, as a preemption
    # or SIGTERM does, at the end of the dispatch that reaches it (train.steps_per_dispatch);
    # rerunning continues towards train.steps
    stop_after: int | None = None
    # resume from this checkpoint step instead of the latest; later steps are set aside
    resume_step: int | None = None
    # auto: resume only under the settings the run was trained with (those that change how
    # or what it learns); force: resume under changed ones
    resume: str = "auto"
    non_finite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # where metrics also go


@dataclass
class CheckpointConfig:
    every: int = 500
    max_to_keep: int = 3
    async_save: bool = True
    # a corrupt or unreadable checkpoint is an error, instead of falling back to an older one
    strict: bool = False


@dataclass
class DistributedConfig:
    enabled: bool | None = None  # None: auto-detect a multi-process environment
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # a process that stops sending heartbeats this long fails the whole job (bounded hang)
    heartbeat_timeout_s: int = 100
    # how long processes wait for each other at start-up before failing
    init_timeout_s: int = 300


@dataclass
class Config:
    run_dir: str = "runs/default"
    dry_run: bool = False
    # a trained run this new one continues on new data (train/warm_start.py): its vocabulary
    # extended, its guide and optimizer moments carried over for the rows it knows
    init_from: str | None = None
    # a trained run whose posterior is this run's prior (train/prior_from.py; it is also the
    # run continued, as init_from), every day-1 sd times prior_widen >= 1 (forgetting)
    prior_from: str | None = None
    prior_widen: float = 1.0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: dict[str, int] = field(default_factory=default_mesh)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def register() -> None:
    """Register the schema so ``configs/config.yaml`` can extend it (``defaults: [schema]``)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


def to_container(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Plain resolved dict of a config (for checkpoints and logs)."""
    return OmegaConf.to_container(
        OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg, resolve=True
    )


# keys whose default changed: a run saved before a key existed keeps the value it ran with
SAVED_DEFAULTS = {
    ("optim", "guide"): "mean_field",
    ("optim", "fm_rows"): "site",
    ("optim", "coupling_lr_factor"): 1.0,
    ("optim", "antithetic"): False,
    ("model", "fm_unit_axis"): True,
}


def with_saved_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config with :data:`SAVED_DEFAULTS` filled in where it lacks them."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for (group, key), value in SAVED_DEFAULTS.items():
        if isinstance(out.get(group), dict):
            out[group].setdefault(key, value)
    return out


def from_container(data: Any, schema: type = Config) -> Any:
    """A typed, read-only config from a plain dict or a composed config (e.g. the one saved
    with a run). Keys the schema lacks are a ``ConfigError`` naming them — including keys a
    command line force-added with Hydra's ``+key=`` syntax."""
    if not isinstance(data, dict):
        data = OmegaConf.to_container(data, resolve=True)
    data = {k: v for k, v in data.items() if k != "hydra"}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), data)
    except (ConfigKeyError, ValidationError) as err:
        # OmegaConf appends "full_key: ... object_type=..." lines: the first says it all
        reason = str(err.msg).strip().splitlines()[0] if str(err.msg).strip() else "invalid"
        raise ConfigError(f"config key {err.full_key!r}: {reason}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


@dataclass
class SummaryConfig:
    run_dir: str = "runs/default"
    step: int | None = None  # default: the latest checkpoint
    strict: bool = False  # a corrupt latest checkpoint is an error, not a fallback
    # a run trained with a model of the user's own (model._target_) is restored only if this
    # names that same function: restoring imports it, so it must be code you trust
    trust_model: str | None = None
    draws: int = 1000
    seed: int = 0


@dataclass
class EffectsConfig:
    run_dir: str = "runs/default"
    term: str = "???"  # a table term's name in model.terms (e.g. user)
    output: str | None = None  # default: <run_dir>/effects/<term>.parquet
    step: int | None = None  # default: the latest checkpoint
    strict: bool = False  # a corrupt latest checkpoint is an error, not a fallback
    trust_model: str | None = None  # as for blayers-summary
    quantiles: list[float] = field(default_factory=lambda: [0.05, 0.5, 0.95])
    chunk_rows: int = 262144  # categories per read: host memory is flat in the table size


@dataclass
class ScoreDataConfig:
    path: str = "data/default/train.parquet"
    batch_size: int = 4096


@dataclass
class ScoreConfig:
    run_dir: str = "runs/default"
    step: int | None = None  # default: the latest checkpoint
    strict: bool = False  # a corrupt latest checkpoint is an error, not a fallback
    # a run trained with a model of the user's own (model._target_) is restored only if this
    # names that same function: restoring imports it, so it must be code you trust
    trust_model: str | None = None
    output: str = "runs/default/scores"
    data: ScoreDataConfig = field(default_factory=ScoreDataConfig)
    passthrough: list[str] | None = None  # default: every non-feature column
    draws: int = 100
    seed: int = 0
    quantiles: list[float] = field(default_factory=lambda: [0.05, 0.5, 0.95])
    linear_predictor: bool = False  # also summarise the linear predictor (eta_*)
    # also the posterior predictive: y drawn from the likelihood under each draw (pred_std,
    # pred_q05, ...), observation noise included, beside E[y | θ]
    predictive: bool = False
    raw_draws: bool = False  # also write the S draws as a list column
    # draw whole tables once (S draws of every row) when they fit in this many MiB, so each
    # batch only reads its rows; larger tables are drawn per batch (train/score.py)
    predraw_mb: int = 256
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def register_tools() -> None:
    cs = ConfigStore.instance()
    cs.store(name="summary_schema", node=SummaryConfig)
    cs.store(name="score_schema", node=ScoreConfig)
    cs.store(name="effects_schema", node=EffectsConfig)
