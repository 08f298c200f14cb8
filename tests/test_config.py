"""Hydra configs: every shipped file loads, typos and wrong types fail naming the key, models
from config and from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from train import config as config_lib
from train.cli import CONFIG_DIR
from train.config import ConfigError
from train.model import Columns, build_model

config_lib.register()
config_lib.register_tools()
GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())


def _compose(overrides=(), name="config"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_default_config_composes_typed():
    cfg = _compose()
    assert cfg.data.batch_size == 4096 and cfg.model.link == "logit"
    assert cfg.mesh.data == -1 and cfg.sharding.rules == [["categories", "model"]]


@pytest.mark.parametrize(
    "group_file",
    [f"{g}={p.stem}" for g in GROUPS for p in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))],
)
def test_every_shipped_group_file_loads_and_builds(group_file):
    cfg = _compose([group_file])
    if group_file.startswith("model="):
        cols = Columns(tuple(cfg.data.numeric), tuple(cfg.data.categorical))
        model = build_model(cfg.model, cols, {"user": 10, "item": 5, "region": 3})
        assert callable(model)


def test_summary_config_loads():
    cfg = _compose(["run_dir=/x"], name="summary")
    assert cfg.run_dir == "/x" and cfg.draws == 1000


def test_score_config_loads_typed():
    cfg = _compose(["run_dir=/x", "draws=7"], name="score")
    assert cfg.output == "/x/scores" and cfg.draws == 7 and list(cfg.quantiles) == [0.05, 0.5, 0.95]
    config_lib.from_container(cfg, config_lib.ScoreConfig)
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["drawz=7"], name="score")


def test_effects_config_composes_and_rejects_typos():
    cfg = _compose(["run_dir=/x", "term=user"], name="effects")
    typed = config_lib.from_container(cfg, config_lib.EffectsConfig)
    assert typed.term == "user" and typed.output is None and typed.chunk_rows > 0
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        _compose(["terms=user"], name="effects")


def test_every_yaml_is_covered():
    top = {p.stem for p in Path(CONFIG_DIR).glob("*.yaml")}
    assert top <= {"config", "summary", "score", "effects"}, top


@pytest.mark.parametrize(
    ("override", "key"),
    [("data.batchsize=3", "batchsize"), ("optim.lrr=0.1", "lrr")],
)
def test_typo_fails_at_load_naming_the_key(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        _compose([override])
    assert key in str(info.value) + str(info.value.__cause__)


def test_force_added_key_is_refused_before_running():
    cfg = _compose(["+trian.steps=3"])  # Hydra's '+' appends even in struct mode ...
    with pytest.raises(ConfigError, match="trian"):  # ... so the service checks again
        config_lib.from_container(cfg)


def test_user_config_dir_with_typo_fails(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "defaults:\n  - schema\n  - _self_\nrun_dir: r\ndata:\n  batch_sise: 8\n"
    )
    errors = (ConfigCompositionException, ConfigKeyError, ValidationError)
    with (
        initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"),
        pytest.raises(errors) as info,
    ):
        compose(config_name="mine")
    assert "batch_sise" in str(info.value) + str(info.value.__cause__)


def test_wrong_type_fails_at_load():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        _compose(["data.batch_size=lots"])
    assert "batch_size" in str(info.value) + str(info.value.__cause__)


def test_model_terms_from_command_line_override_grammar():
    cfg = _compose(
        [
            "model.terms=[{layer:InterceptLayer,name:bias},"
            "{layer:RandomEffectsLayer,name:user,inputs:[user]}]"
        ]
    )
    assert [t["layer"] for t in cfg.model.terms] == ["InterceptLayer", "RandomEffectsLayer"]
    model = build_model(cfg.model, Columns(("x1",), ("user",)), {"user": 7})
    assert [t.name for t in model.terms] == ["bias", "user"]


@pytest.mark.parametrize(
    ("terms", "link", "message"),
    [
        (
            [{"layer": "Adaptivelayer", "name": "d", "inputs": ["x1"]}],
            "logit",
            "unknown layer 'Adaptivelayer'",
        ),
        ([{"layer": "InterceptLayer", "name": "b"}], "logitt", "unknown link 'logitt'"),
        (
            [{"layer": "FMLayer", "name": "fm", "inputs": ["x1"], "low_rnk_dim": 2}],
            "logit",
            "no argument 'low_rnk_dim'",
        ),
        (
            [{"layer": "AdaptiveLayer", "name": "d", "inputs": ["x9"]}],
            "logit",
            "column 'x9' is not in data.numeric",
        ),
        (
            [{"layer": "AdaptiveLayer", "name": "d", "inputs": ["x1"], "coef_dist": "Normall"}],
            "logit",
            "coef_dist='Normall'",
        ),
        (
            [
                {
                    "layer": "AdaptiveLayer",
                    "name": "d",
                    "inputs": ["x1"],
                    "coef_kwargs": {"mean": 0.0},
                }
            ],
            "logit",
            "coef_kwargs",
        ),
        ([], "logit", "model.terms is empty"),
    ],
)
def test_bad_model_configs_name_the_problem(terms, link, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_model({"link": link, "terms": terms}, Columns(("x1",), ("user",)), {"user": 4})


def test_fm_over_categorical_fields_uses_the_embedding_path():
    model = build_model(
        {
            "link": "logit",
            "terms": [{"layer": "FMLayer", "name": "fm", "inputs": ["u", "i"], "low_rank_dim": 3}],
        },
        Columns((), ("u", "i")),
        {"u": 10, "i": 6},
        pad_multiple=4,
    )
    term = model.terms[0]
    assert type(term.layer).__name__ == "CategoricalFMLayer"
    # each field gets one OOV row (11, 7); the last field pads the table to a multiple of 4
    assert term.num_categories == (11, 9)


def test_cli_typo_exits_nonzero_naming_the_key(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(CONFIG_DIR).parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "train", f"run_dir={tmp_path}/r", "train.stepz=5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "stepz" in proc.stderr + proc.stdout
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("path", ["mydata/trian.parquet", "mydata/nothing-*.parquet"])
def test_a_mistyped_data_path_is_refused_and_nothing_is_generated(tmp_path, path):
    """``generate_default: true`` (the default job's setting) applies to the shipped default
    path only: any other missing path or empty glob is one line naming ``data.path``, exit 2,
    and nothing is written into the user's folder."""
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "truth.json").write_text("mine")
    env = {**os.environ, "PYTHONPATH": str(Path(CONFIG_DIR).parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "train", "run_dir=r", f"data.path={path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.path" in lines[0] and path in lines[0], lines
    assert "generating" not in proc.stdout
    assert sorted(p.name for p in (tmp_path / "mydata").iterdir()) == ["truth.json"]
    assert (tmp_path / "mydata" / "truth.json").read_text() == "mine"


def test_explicit_mesh_sizes_below_the_device_count_use_the_first_devices():
    import jax
    from omegaconf import OmegaConf

    from train.plan import ShardingPlan

    def mesh(data, model):
        cfg = {
            "mesh": {"data": data, "model": model},
            "sharding": {"rules": [["categories", "model"]]},
        }
        return ShardingPlan.from_config(OmegaConf.create(cfg)).mesh

    two = mesh(2, 1)
    assert dict(two.shape) == {"data": 2, "model": 1}
    assert list(two.devices.ravel()) == jax.devices()[:2]
    assert mesh(-1, 2).devices.size == jax.device_count() == 8
    with pytest.raises(ConfigError, match=r"mesh: .*needs 9 devices but 8"):
        mesh(3, 3)
