"""train/settings.py: each bad setting refused in one line naming the key and the fix, and
a resume under changed settings refused naming what changed."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from train.config import Config, ConfigError, ScoreConfig, to_container
from train.settings import (
    changed_settings,
    check_resume_settings,
    check_score_settings,
    check_settings,
)


def _cfg(**settings):
    cfg = OmegaConf.structured(Config)
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.steps", 0, "train.steps=0 must be positive"),
        ("optim.lr", math.nan, "optim.lr=nan must be positive"),
        ("optim.lr", math.inf, "optim.lr=inf must be positive"),
        ("optim.name", "sgdd", "optim.name='sgdd': choose one of"),
        ("optim.coupling_lr_factor", 1.5, r"optim.coupling_lr_factor=1.5 must lie in \(0, 1\]"),
        ("checkpoint.max_to_keep", 0, "a run keeps its latest checkpoint to resume from"),
        ("train.non_finite.policy", "ignore", "train.non_finite.policy='ignore': choose"),
        ("train.non_finite.lr_factor", 1.0, r"must lie in \(0, 1\), e.g. 0.5"),
        ("model.link", "probit", "model.link: unknown link 'probit'"),
        ("model.link", "ordinal", "needs model.link_kwargs.num_classes"),
        ("optim.guide", "full_rank", "optim.guide='full_rank': choose one of"),
        ("optim.start", "random", "optim.start='random': choose data or zero"),
        ("prior_widen", 0.5, "prior_widen=0.5: a forgetting factor is at least 1"),
        ("train.until", "forever", "train.until='forever': choose steps or converged"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(_cfg(**{key: value}))


def test_the_defaults_pass():
    check_settings(_cfg())
    check_score_settings(OmegaConf.structured(ScoreConfig))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"draws": 0}, "draws=0 must be at least 1"),
        ({"quantiles": [0.5, 1.5]}, r"must lie in \[0, 1\]"),
        ({"quantiles": [0.5, 0.5]}, "repeats a level"),
        ({"predraw_mb": -1}, "predraw_mb=-1 must be >= 0"),
    ],
)
def test_a_bad_scoring_setting_is_refused(settings, message):
    cfg = OmegaConf.structured(ScoreConfig)
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError, match=message):
        check_score_settings(cfg)


def test_a_resume_names_each_changed_setting_and_ignores_the_safe_ones():
    saved = to_container(_cfg())
    now = _cfg(**{"optim.lr": 0.05, "train.steps": 99, "mesh.data": 2, "checkpoint.every": 7})
    assert changed_settings(saved, now) == ["optim.lr: 0.01 → 0.05"]
    with pytest.raises(ConfigError, match=r"optim.lr: 0.01 → 0.05"):
        check_resume_settings(saved, now)
    check_resume_settings(saved, _cfg(**{"optim.lr": 0.05, "train.resume": "force"}))


def test_a_run_saved_before_a_setting_existed_counts_it_at_its_old_default():
    saved = to_container(_cfg())
    del saved["optim"]["antithetic"]  # saved before the antithetic pair existed: off
    assert changed_settings(saved, _cfg()) == ["optim.antithetic: False → True"]
    assert changed_settings(saved, _cfg(**{"optim.antithetic": False})) == []
