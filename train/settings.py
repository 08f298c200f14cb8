"""Settings refused before any data is read: one line naming the key and the fix.

Types are already checked when the config loads (``train.config``); these are the values a
type cannot rule out. The mesh, the rules and the batch size are checked by ``train.plan``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from blayers import guides, links

from .config import (
    Config,
    ConfigError,
    NonFiniteConfig,
    ScoreConfig,
    from_container,
    to_container,
    with_saved_defaults,
)
from .guide_plan import FM_ROWS
from .nonfinite import POLICIES
from .state import OPTIMIZERS, SCHEDULES


def _positive(value: Any, key: str, what: str = "must be positive") -> None:
    # written as "not > 0" so that NaN is refused too, and inf is no setting either
    if value is None or not value > 0 or value == math.inf:
        raise ConfigError(f"{key}={value} {what}")


def check_run_settings(cfg: Config) -> None:
    """Steps, cadences, optimizer and data-stage values."""
    _positive(cfg.train.steps, "train.steps", "must be positive (the run's total step count)")
    if cfg.train.stop_after is not None:
        _positive(cfg.train.stop_after, "train.stop_after", "must be positive, or null")
    _positive(cfg.train.log_every, "train.log_every")
    _positive(cfg.train.steps_per_dispatch, "train.steps_per_dispatch")
    _positive(cfg.checkpoint.every, "checkpoint.every")
    _positive(
        cfg.checkpoint.max_to_keep,
        "checkpoint.max_to_keep",
        "must be at least 1: a run keeps its latest checkpoint to resume from",
    )
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.optim.name!r}: choose one of {sorted(OPTIMIZERS)}")
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={cfg.optim.schedule!r}: choose one of {list(SCHEDULES)}")
    _positive(cfg.optim.lr, "optim.lr", "must be positive, e.g. 0.01")
    _positive(cfg.optim.guide_init_scale, "optim.guide_init_scale")
    if not 0 < cfg.optim.coupling_lr_factor <= 1:
        raise ConfigError(
            f"optim.coupling_lr_factor={cfg.optim.coupling_lr_factor} must lie in (0, 1]"
        )
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= 0")
    if not 0 <= cfg.optim.end_lr_factor <= 1:
        raise ConfigError(f"optim.end_lr_factor={cfg.optim.end_lr_factor} must lie in [0, 1]")
    if cfg.optim.clip_norm is not None:
        _positive(cfg.optim.clip_norm, "optim.clip_norm", "must be positive, or null")
    _positive(cfg.data.shuffle_block, "data.shuffle_block", "must be positive (1: per-row)")
    if cfg.data.prefetch < 0:
        raise ConfigError(f"data.prefetch={cfg.data.prefetch} must be >= 0")
    if cfg.train.resume not in ("auto", "force"):
        raise ConfigError(f"train.resume={cfg.train.resume!r}: choose auto or force")
    check_non_finite_settings(cfg.train.non_finite)


def check_non_finite_settings(nf: NonFiniteConfig) -> None:
    """``train.non_finite``: the policy and its limits."""
    if nf.policy not in POLICIES:
        raise ConfigError(f"train.non_finite.policy={nf.policy!r}: choose one of {list(POLICIES)}")
    _positive(nf.max_skipped, "train.non_finite.max_skipped")
    _positive(nf.max_rollbacks, "train.non_finite.max_rollbacks")
    if not 0 < nf.lr_factor < 1:
        raise ConfigError(f"train.non_finite.lr_factor={nf.lr_factor} must lie in (0, 1), e.g. 0.5")


def check_model_settings(cfg: Config) -> None:
    """The link (a model of the user's own, ``model._target_``, brings its own). The mesh and
    the sharding rules are checked by the plan that uses them (:mod:`train.plan`)."""
    if cfg.model.get("_target_"):
        return
    link = str(cfg.model.link)
    try:
        links.get_link(link)
    except ValueError as err:
        raise ConfigError(f"model.link: {err}") from None
    if link == "categorical":
        raise ConfigError(
            "model.link=categorical needs one linear predictor per class, which the configured "
            "terms do not make: use ordinal for ordered classes, or a model of your own "
            "(model._target_)"
        )
    if link == "ordinal":
        k = (cfg.model.link_kwargs or {}).get("num_classes")
        if not isinstance(k, int) or k < 2:
            raise ConfigError(
                f"model.link=ordinal needs model.link_kwargs.num_classes, an integer >= 2 "
                f"(the number of ordered classes); got {k!r}"
            )


def check_posterior_settings(cfg: Config) -> None:
    """The guide, start, recentering and convergence settings."""
    conv = cfg.train.convergence
    if cfg.optim.guide not in guides.GUIDES:
        raise ConfigError(f"optim.guide={cfg.optim.guide!r}: choose one of {list(guides.GUIDES)}")
    if cfg.optim.fm_rows not in FM_ROWS:
        raise ConfigError(f"optim.fm_rows={cfg.optim.fm_rows!r}: choose one of {list(FM_ROWS)}")
    if cfg.optim.start not in ("data", "zero"):
        raise ConfigError(f"optim.start={cfg.optim.start!r}: choose data or zero")
    if not cfg.prior_widen >= 1.0:
        raise ConfigError(
            f"prior_widen={cfg.prior_widen}: a forgetting factor is at least 1 (1: day 1's "
            "posterior as it is; 1.5: every sd half as wide again)"
        )
    if cfg.prior_from and cfg.init_from and str(cfg.prior_from) != str(cfg.init_from):
        raise ConfigError(
            f"prior_from={cfg.prior_from} and init_from={cfg.init_from}: a run continues the "
            "run whose posterior is its prior; leave init_from out"
        )
    if cfg.optim.recenter_every < 0:
        raise ConfigError(
            f"optim.recenter_every={cfg.optim.recenter_every} must be >= 0 (0: never)"
        )
    if cfg.train.until not in ("steps", "converged"):
        raise ConfigError(f"train.until={cfg.train.until!r}: choose steps or converged")
    if conv.sample_every < 1 or conv.patience < 1 or (conv.window is not None and conv.window < 1):
        raise ConfigError("train.convergence: sample_every, patience and window must be positive")


def check_metric_settings(cfg: Config) -> None:
    """A metrics sink that is turned on needs its library, named before any work."""
    wanted = {"tensorboard": "tensorboardX", "mlflow": "mlflow"}
    for key, module in wanted.items():
        if getattr(cfg.train.metrics, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.metrics.{key}=true needs {module}: pip install 'blayers[{key}]', "
                f"or set train.metrics.{key}=false"
            )


def check_settings(cfg: Config) -> None:
    """Every check above, in order."""
    check_run_settings(cfg)
    check_model_settings(cfg)
    check_posterior_settings(cfg)
    check_metric_settings(cfg)


def check_score_settings(cfg: ScoreConfig) -> None:
    """The scoring job's draws, quantiles and batch size."""
    _positive(cfg.draws, "draws", "must be at least 1")
    levels = list(cfg.quantiles)
    if not all(0.0 <= q <= 1.0 for q in levels):
        raise ConfigError(f"quantiles={levels} must lie in [0, 1]")
    if len(set(levels)) != len(levels):
        raise ConfigError(f"quantiles={levels} repeats a level; list each once")
    _positive(cfg.data.batch_size, "data.batch_size", "must be positive")
    if cfg.predraw_mb < 0:
        raise ConfigError(f"predraw_mb={cfg.predraw_mb} must be >= 0 (0: draw per batch)")


# settings that change neither what a run learns nor how: where and how long it runs, how
# often it logs and saves, the devices and the placement (a checkpoint restores onto any mesh),
# and what it does if it diverges (changed to rerun a run that did)
SAFE_TO_CHANGE = (
    "run_dir",
    "init_from",  # read once, when the run starts; its vocabulary is the run's own after
    "prior_from",  # likewise: the prior is the run's own after (<run_dir>/prior)
    "dry_run",
    "train.steps",
    "train.stop_after",
    "train.progress",
    "train.log_every",
    "train.steps_per_dispatch",
    "train.resume_step",
    "train.resume",
    "train.non_finite",
    "train.until",
    "train.convergence",
    "train.metrics",
    "checkpoint",
    "data.prefetch",
    "data.dedicated_cores",
    "data.generate_default",
    "data.default_rows",
    "mesh",
    "sharding",
    "distributed",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def under(key: str, prefixes: Sequence[str]) -> bool:
    """``key`` is one of ``prefixes`` or inside one of them (``optim.lr`` is under ``optim``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differences(before: Any, now: Any, selected: Callable[[str], bool]) -> list[str]:
    """``key: before → now`` for every dotted key of two configs that ``selected`` picks and
    whose values differ."""
    old, new = _flat(to_container(before)), _flat(to_container(now))
    keys = sorted(k for k in set(old) | set(new) if selected(k))
    return [_change(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def changed_settings(saved_config: Mapping[str, Any], cfg: Config) -> list[str]:
    """``key: saved → now`` for every setting that differs from the one a run was trained
    with, beyond :data:`SAFE_TO_CHANGE` (keys a run saved before they existed count at their
    defaults)."""
    saved = from_container(with_saved_defaults(dict(saved_config)))
    return differences(saved, cfg, lambda k: not under(k, SAFE_TO_CHANGE))


def _change(key: str, before: Any, after: Any, width: int = 40) -> str:
    """``key: before → after``, long values (a list of terms) summarized."""
    if len(repr(before)) <= width and len(repr(after)) <= width:
        return f"{key}: {before!r} → {after!r}"
    if isinstance(before, list) and isinstance(after, list):
        return f"{key}: changed ({len(before)} → {len(after)} entries)"
    return f"{key}: changed"


def check_resume_settings(saved_config: Mapping[str, Any], cfg: Config) -> None:
    """Refuse to resume a run under changed settings, naming them, unless
    ``train.resume=force``."""
    changed = changed_settings(saved_config, cfg)
    if changed and cfg.train.resume != "force":
        raise ConfigError(
            f"the run in {cfg.run_dir} was trained with other settings ({'; '.join(changed)}): "
            "use a new run_dir, restore those settings, or pass train.resume=force to continue "
            "under the new ones"
        )
