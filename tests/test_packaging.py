"""A plain (non-editable) install works off the repo: the wheel holds the library and the
service as ``blayers.train`` with its default configs, and no top-level ``train`` package."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from tests.service_helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: a build writes build/ and *.egg-info/ beside its sources
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("blayers", "train", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("blayers-*.whl")
    return found


def test_the_wheel_ships_the_configs_inside_the_package_and_no_top_level_train(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = wheel.name.split("-py3")[0] + ".dist-info"
    assert {n.split("/")[0] for n in names} == {"blayers", dist_info}
    shipped = {n.removeprefix("blayers/train/configs/") for n in names if "/configs/" in n}
    repo = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped == repo


def test_the_installed_commands_run_from_anywhere_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300
    )
    # the dependencies come from this environment's site-packages (a path entry only: its
    # editable install of this repo is not loaded), the project itself from the wheel
    fresh = subprocess.run(
        [str(py), "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(fresh, "deps.pth"), "w") as fh:
        fh.write(site.getsitepackages()[0] + "\n")
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    helped = subprocess.run(
        [str(venv / "bin" / "blayers-train"), "--help"],
        capture_output=True,
        text=True,
        cwd=away,
        env=env,
        timeout=300,
    )
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "optim: adagrad, adam" in helped.stdout
    where = subprocess.run(
        [str(py), "-c", "import blayers.train.cli as c; print(c.CONFIG_DIR)"],
        capture_output=True,
        text=True,
        cwd=away,
        env=env,
        timeout=300,
    )
    assert where.stdout.strip().startswith(fresh), where.stdout + where.stderr
    shadow = subprocess.run(
        [str(py), "-c", "import train"], capture_output=True, text=True, cwd=away, env=env
    )
    assert "No module named 'train'" in shadow.stderr
    assert list(away.iterdir()) == []
