"""The package works from a non-editable install: the demo's and the study's configs are package data.

The wheel is built from a copy of the checkout and unpacked into a folder of its own (that is what
installing a pure-Python wheel does), then imported from a directory that is not a checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import pipeline, pipeline.demo, pipeline.study
from pipeline.config import load_config
assert pipeline.__file__.startswith({site!r}), pipeline.__file__
tiny = load_config(pipeline.demo.DEFAULT_CONFIG)
study = load_config(pipeline.study.DEFAULT_CONFIG)
documented = load_config("jobs/configs/tiny.yaml")  # the README's path, no checkout in sight
method = load_config("methods/dino.yaml")
print(tiny.model.encoder, study.train.run_name, documented == tiny, method.objective.name)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel's files unpacked into a site folder; returns it."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path_factory.mktemp("wheels")
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-v",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheels),
        str(src),
    ]
    out = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheels / "build.log").write_text(out.stdout + out.stderr)
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(next(wheels.glob("abpipe-*.whl"))) as wheel:
        wheel.extractall(site)
    (site / "build.log").write_text((wheels / "build.log").read_text())
    return site


def test_the_build_prints_no_deprecation_banner(installed):
    """setuptools warns (twice per build) while `project.license` is a TOML table instead of an SPDX string."""
    log = (installed / "build.log").read_text()
    assert "Created wheel for abpipe" in log
    assert "deprecated" not in log.lower(), [line for line in log.splitlines() if "deprecated" in line.lower()]


def test_configs_ship_in_the_wheel(installed):
    shipped = sorted(
        p.relative_to(installed / "pipeline" / "configs").as_posix() for p in installed.rglob("configs/**/*.yaml")
    )
    in_checkout = sorted(
        p.relative_to(REPO / "pipeline" / "configs").as_posix() for p in (REPO / "pipeline" / "configs").rglob("*.yaml")
    )
    assert shipped == in_checkout and "tiny.yaml" in shipped and "methods/dino.yaml" in shipped


def test_demo_and_study_configs_load_outside_a_checkout(installed, tmp_path):
    env = {"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(site=str(installed))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    encoder, run_name, same, method = out.stdout.split()
    assert encoder and run_name and same == "True" and method == "dino"


def test_a_missing_config_names_the_packaged_ones(tmp_path, monkeypatch):
    from pipeline.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"--config nope.yaml: config file not found \(packaged configs: .*tiny.yaml"):
        load_config("nope.yaml")
    assert load_config("tiny") == load_config(REPO / "jobs" / "configs" / "tiny.yaml")  # the checkout's link
