"""PSplineLayer and HSGPLayer in the service: declared in model.terms with one numeric input,
their domain (knots; centre and L) set from the training data's range unless the config
gives it, written into the resolved config and the checkpoints' metadata, reused at scoring;
the fitted curve recovers a known smooth function through the command line; bad settings are
config errors naming the term."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from blayers.splines import even_knots
from blayers.start import FeatureStats
from tests.service_helpers import quiet_config, run_cli
from train import loop, smooth
from train.config import ConfigError


def truth(x: np.ndarray) -> np.ndarray:
    return np.sin(x) + 0.1 * x


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(7)
    n = 2000
    x = rng.uniform(2.0, 10.0, n).astype(np.float32)  # off-centre: the HSGP must centre it
    y = 0.5 + truth(x) + rng.normal(0, 0.3, n)
    path = tmp_path_factory.mktemp("smooth") / "train.parquet"
    pq.write_table(pa.table({"x": x, "y": y.astype(np.float32)}), path)
    return path


def settings(term: dict, **more) -> dict:
    return {
        "data.numeric": ["x"],
        "data.categorical": [],
        "data.batch_size": 250,
        "model.link": "gaussian",
        "model.terms": [{"layer": "InterceptLayer", "name": "bias"}, term],
        "train.steps": 1500,
        "checkpoint.every": 1500,
        "optim.lr": 0.03,
        "mesh.data": 1,
        **more,
    }


PSPLINE = {"layer": "PSplineLayer", "name": "f", "inputs": ["x"], "num_knots": 12}
HSGP = {"layer": "HSGPLayer", "name": "g", "inputs": ["x"], "m": 20}


@pytest.mark.parametrize("term", [PSPLINE, HSGP], ids=["pspline", "hsgp"])
def test_a_smooth_term_trains_scores_and_recovers_the_curve(dataset, tmp_path, term):
    run = tmp_path / "run"
    lines: list[str] = []
    loop.train(quiet_config(dataset, run, settings(term)), log=lines.append)
    resolved = yaml.safe_load((run / "config.yaml").read_text())["model"]["terms"][1]
    x = pq.read_table(dataset)["x"].to_numpy()
    if term["layer"] == "PSplineLayer":
        assert resolved["range"] == pytest.approx([x.min(), x.max()])
    else:
        mid, half = (x.min() + x.max()) / 2, (x.max() - x.min()) / 2
        assert resolved["center"] == pytest.approx(mid)
        assert resolved["L"] == pytest.approx(1.5 * half)
    assert any("model.terms[" in line and "'x'" in line for line in lines), lines
    assert f"f_{term['name']}(x)" in (run / "model.txt").read_text()

    # scoring, on a grid that runs past the training range on both sides
    grid = np.linspace(0.0, 12.0, 121).astype(np.float32)
    grid_path = tmp_path / "grid.parquet"
    pq.write_table(pa.table({"x": grid}), grid_path)
    out = tmp_path / "scores"
    proc = run_cli("score", f"run_dir={run}", f"data.path={grid_path}", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    mean = pq.read_table(out)["mean"].to_numpy()
    inside = (grid >= 2.5) & (grid <= 9.5)
    # the intercept absorbs the curve's level; compare shapes
    err = (mean - truth(grid))[inside]
    assert np.abs(err - err.mean()).max() < 0.25, np.abs(err - err.mean()).max()
    assert np.isfinite(mean).all()
    if term["layer"] == "PSplineLayer":  # held at the boundary value past the knots
        assert mean[grid < 2.0].std() < 1e-4 and mean[grid > 10.0].std() < 1e-4


def test_a_given_domain_is_kept_and_one_short_of_the_data_refused(dataset, tmp_path):
    given = {**HSGP, "center": 6.0, "L": 6.0}
    cfg = quiet_config(dataset, tmp_path / "ok", settings(given, **{"train.steps": 2}))
    loop.train(cfg, log=lambda _: None)
    resolved = yaml.safe_load((tmp_path / "ok" / "config.yaml").read_text())["model"]["terms"][1]
    assert (resolved["center"], resolved["L"]) == (6.0, 6.0)

    short = {**HSGP, "center": 6.0, "L": 2.0}
    run = tmp_path / "short"
    with pytest.raises(ConfigError, match=r"model.terms\[g\].*raise L to at least 5.99"):
        loop.train(quiet_config(dataset, run, settings(short)), log=lambda _: None)
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


@pytest.mark.parametrize(
    ("term", "message"),
    [
        ({**PSPLINE, "inputs": ["x", "x"]}, "takes exactly one numeric input"),
        ({**PSPLINE, "range": [3, 1]}, "low < high"),
        ({**PSPLINE, "num_knots": 0}, "num_knots must be an integer >= 1"),
        ({**PSPLINE, "center": 1.0}, "has no argument 'center'"),
        ({k: v for k, v in HSGP.items() if k != "m"}, "HSGPLayer needs m"),
        ({**HSGP, "L": -1.0}, "L must be > 0"),
        ({**HSGP, "range": [0, 1]}, "has no argument 'range'"),
    ],
)
def test_bad_smooth_settings_fail_before_the_data_is_read(tmp_path, term, message):
    cfg = quiet_config(tmp_path / "absent.parquet", tmp_path / "run", settings(term))
    with pytest.raises(ConfigError, match=r"model\.terms") as err:
        loop.check_terms(cfg)
    assert message in str(err.value)


def test_domains_from_the_columns_range():
    stats = FeatureStats()
    stats.update(np.array([[1.0, -4.0], [3.0, 6.0]]))
    terms = smooth.with_domains(
        [PSPLINE | {"inputs": ["b"]}, HSGP | {"inputs": ["b"]}, {"layer": "AdaptiveLayer"}],
        ("a", "b"),
        stats,
    )
    assert terms[0]["range"] == [-4.0, 6.0] and terms[0]["num_knots"] == 12
    assert terms[1]["center"] == 1.0 and terms[1]["L"] == 7.5
    assert terms[2] == {"layer": "AdaptiveLayer"}
    knots = smooth.domain(terms[0], degree=3)["knots"]
    np.testing.assert_allclose(knots, even_knots(-4.0, 6.0, 12, 3))
    assert knots.shape == (12 + 8,) and float(knots[4]) == pytest.approx(-4.0 + 10.0 / 13)
    with pytest.raises(ConfigError, match="constant"):
        constant = FeatureStats()
        constant.update(np.ones((3, 1)))
        smooth.with_domains([PSPLINE], ("x",), constant)


def test_every_smooth_layer_has_its_domain_keys():
    from train.model import service_layers

    smooth_layers = {n for n, c in service_layers().items() if c.input_kind == "smooth"}
    assert smooth_layers == set(smooth.SMOOTH) == {"PSplineLayer", "HSGPLayer"}
