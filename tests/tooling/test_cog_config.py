"""cog.yaml: valid against Cog's published config schema, current keys only, same Python/CUDA/pins as the project."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema_rs
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# Cog's published config schema (v1.0), vendored so that the check runs on a fresh clone.
COG_CONFIG_SCHEMA = REPO / "tests" / "data" / "cog_config_schema_v1.0.json"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "cog.yaml").read_text())


@pytest.fixture(scope="module")
def validator():
    return jsonschema_rs.validator_for(json.loads(COG_CONFIG_SCHEMA.read_text()))


def test_cog_yaml_validates_against_cogs_config_schema(config, validator):
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(config)]
    assert errors == []


def test_the_schema_check_rejects_a_broken_config(validator):
    broken = {"build": {"gpu": "yes", "python_version": "3.11", "weights": "x"}, "run": "predict.py:Runner"}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_cog_yaml_uses_current_keys_and_points_at_the_runner(config):
    assert "predict" not in config, "`predict:` is deprecated in favour of `run:`"
    assert "concurrency" not in config, "`concurrency.max` is deprecated in favour of @cog.concurrent(max=N)"
    assert "python_packages" not in config["build"], "`python_packages` is deprecated: use python_requirements"
    path, _, cls = config["run"].partition(":")
    assert (REPO / path).is_file()
    assert re.search(rf"^class {cls}\(BaseRunner\)", (REPO / path).read_text(), re.MULTILINE)


def test_gpu_build_matches_the_runpod_image(config):
    dockerfile = (REPO / "Dockerfile.runpod").read_text()
    python = re.search(r"\bpython3\.(\d+)=", dockerfile)
    cuda = re.search(r"ARG BASE_IMAGE=nvidia/cuda:(\d+)\.(\d+)", dockerfile)
    assert python and cuda, "Dockerfile.runpod no longer names its Python package / CUDA base image"
    assert config["build"]["gpu"] is True
    assert str(config["build"]["python_version"]) == f"3.{python.group(1)}"
    assert str(config["build"]["cuda"]) == f"{cuda.group(1)}.{cuda.group(2)}"


def test_cog_requirements_are_the_projects_pins(config):
    requirements = REPO / config["build"]["python_requirements"]
    lines = [ln for ln in requirements.read_text().splitlines() if ln and not ln.startswith("#")]
    torch_pin = [ln for ln in (REPO / "requirements-torch.txt").read_text().splitlines() if ln.startswith("torch==")]
    assert lines[0] == torch_pin[0], "torch must come first, pinned as in requirements-torch.txt"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "checks" / "write_cog_requirements.py"), "--check"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert not any(ln.startswith("runpod") for ln in lines)


def test_no_deps_packages_are_installed_without_their_dependencies(config):
    nodeps = [ln.split("#", 1)[0].strip() for ln in (REPO / "requirements-nodeps.txt").read_text().splitlines()]
    nodeps = [ln for ln in nodeps if ln]
    requirements = (REPO / config["build"]["python_requirements"]).read_text().splitlines()
    assert nodeps and not set(nodeps) & set(requirements), "pip would pull their declared dependencies (torchvision)"
    runs = [cmd if isinstance(cmd, str) else cmd["command"] for cmd in config["build"].get("run", [])]
    installs = [cmd.split() for cmd in runs if cmd.startswith("pip install --no-deps ")]
    assert installs and sorted(installs[0][3:]) == sorted(nodeps)


def test_no_weights_go_into_the_image(config):
    assert "weights" not in config, "no weights in the image: setup() fetches them"
    ignored = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    assert "bucket" in ignored, "cog build copies the project folder: the local weights bucket must stay out"


def test_sdk_version_is_the_one_tested_here(config):
    import cog

    assert config["build"]["sdk_version"] == cog.__version__
