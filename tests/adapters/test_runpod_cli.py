"""`python handler.py` in the runpod SDK's local test mode (exit code and output), and the RunPod config files."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from sd_core import a1111
from sd_core.schema import parse_request
from sd_core.settings import ENV_ALIASES, Settings
from tests.fixtures.runpod_server import run_test_input

REPO = Path(__file__).resolve().parents[2]


def test_test_input_json_runs_and_exits_0(runpod_weights_env, tmp_path):
    """No arguments: the SDK runs test_input.json (the repository's own) through the handler."""
    done = run_test_input(None, runpod_weights_env, log_dir=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "Job local_test completed successfully." in done.stdout
    assert "'seed': 42" in done.stdout and "'mime_type': 'image/png'" in done.stdout


def test_bad_test_input_exits_1_naming_the_field(runpod_weights_env, tmp_path):
    done = run_test_input({"input": {"prompt": "x", "num_inference_steps": 999}}, runpod_weights_env,
                          log_dir=tmp_path)
    assert done.returncode == 1, done.stdout[-4000:]
    assert "num_inference_steps: Input should be less than or equal to 150" in done.stdout
    assert "Traceback" not in done.stdout


def test_a_worker_whose_cold_start_fails_fails_its_jobs_with_the_reason(runpod_weights_env, tmp_path):
    env = {**runpod_weights_env, "SD_DEFAULT_MODEL": "missing", "RUNPOD_LOG_LEVEL": "DEBUG"}
    done = run_test_input({"input": {"prompt": "x"}}, env, log_dir=tmp_path)
    assert done.returncode == 1, done.stdout[-4000:]
    assert "worker failed to start: model: unknown model 'missing'" in done.stdout
    assert "Traceback" not in done.stdout
    # refresh_worker reached the SDK, which turns it into stopPod (RunPod then replaces the worker).
    assert "'stopPod': True" in done.stdout


# --- configuration files -------------------------------------------------------------------------------------------
def test_test_input_json_is_a_valid_request():
    job = json.loads((REPO / "test_input.json").read_text())
    parse_request(job["input"])


def test_hub_tests_are_valid_requests():
    tests = json.loads((REPO / ".runpod" / "tests.json").read_text())
    assert tests["tests"]
    for test in tests["tests"]:
        call = a1111.parse_call(test["input"])
        a1111.to_request(call) if call else parse_request(test["input"])


def test_hub_env_documents_only_variables_the_worker_reads():
    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    assert hub["type"] == "serverless" and hub["config"]["env"]
    known = {"SD_" + f.name.upper() for f in fields(Settings)} | set(ENV_ALIASES.values())
    known |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # boto3's own credential chain (weights)
    defaults = Settings()
    for entry in hub["config"]["env"]:
        assert entry["key"] in known, entry["key"]
        default = entry["input"].get("default")
        name = next((n for n, var in ENV_ALIASES.items() if var == entry["key"]), entry["key"][3:].lower())
        if default is not None and hasattr(defaults, name):
            assert default == getattr(defaults, name), entry["key"]


@pytest.mark.parametrize("path", ["handler.py", "sd_core/a1111.py", "sd_core/uploads.py"])
def test_runpod_code_reads_no_environment(path):
    """Configuration is read in sd_core/settings.py only."""
    source = (REPO / path).read_text()
    assert "os.environ" not in source and "getenv" not in source
