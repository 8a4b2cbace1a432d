"""Container image and CI files: lint (hadolint, actionlint, shellcheck), workflow rules, the build/push CLI without
an engine, and (opt-in, slow) the real podman build of Dockerfile.runpod with the handler run inside it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the linters come as wheels into the same environment as pytest
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed (requirements-dev.txt)")
        return found
    return str(path)


def run_tool(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # BIN first on PATH: actionlint runs shellcheck on the workflows' run: scripts when it finds it.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_dockerfile_passes_hadolint():
    proc = run_tool(tool("hadolint"), "Dockerfile.runpod")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflows_pass_actionlint_with_shellcheck():
    assert {path.name for path in WORKFLOWS} >= {"ci.yml", "runpod-image.yml", "replicate-push.yml"}
    proc = run_tool(tool("actionlint"), f"-shellcheck={tool('shellcheck')}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_checks_run_scripts_with_shellcheck(tmp_path):
    # The lint above means something only if shellcheck really runs on the run: scripts.
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo $unquoted\n")
    proc = run_tool(tool("actionlint"), f"-shellcheck={tool('shellcheck')}", str(bad))
    assert proc.returncode == 1
    assert "SC2086" in proc.stdout


def test_shell_scripts_pass_shellcheck():
    scripts = sorted(str(path.relative_to(REPO)) for path in (REPO / "scripts").rglob("*.sh"))
    assert "scripts/ops/runpod-entrypoint.sh" in scripts
    proc = run_tool(tool("shellcheck"), *scripts)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _steps():
    for path in WORKFLOWS:
        workflow = yaml.safe_load(path.read_text())
        for job_name, job in workflow["jobs"].items():
            for step in job.get("steps", []):
                yield path.name, job_name, step


def test_workflow_actions_are_pinned_to_exact_versions():
    pinned = re.compile(r"^[\w.-]+/[\w./-]+@(v\d+\.\d+\.\d+|[0-9a-f]{40})$")
    loose = [f"{name}/{job}: {step['uses']}" for name, job, step in _steps()
             if "uses" in step and not pinned.match(step["uses"])]
    assert not loose, f"actions not pinned to vX.Y.Z or a commit: {loose}"


def test_workflow_scripts_never_expand_secrets_inline():
    # A secret expanded into a run: script lands in the script file on the runner; pass it through env: instead.
    inline = [f"{name}/{job}: {step.get('name', step['run'][:40])}" for name, job, step in _steps()
              if "run" in step and "secrets." in step["run"]]
    assert not inline, f"secrets expanded inside run: scripts: {inline}"


def test_images_cli_without_engine_says_where_it_looked(tmp_path):
    socket = tmp_path / "no-engine.sock"
    proc = subprocess.run([sys.executable, "scripts/ops/container_images.py", "build", "-t", "sd-test:x"], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DOCKER_HOST": f"unix://{socket}"})
    assert proc.returncode == 2, proc.stderr
    assert f"no Docker-API engine reachable at unix://{socket}" in proc.stderr
    assert "podman system service" in proc.stderr  # how to get an engine
    assert "Traceback" not in proc.stderr


def test_images_cli_refuses_a_password_on_the_command_line():
    proc = subprocess.run([sys.executable, "scripts/ops/container_images.py", "push", "-t", "r.example/x:y",
                           "--username", "u"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--password-stdin" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_runpod_image_builds_and_runs_the_handler(tmp_path):
    """podman build of Dockerfile.runpod (CPU torch, local Debian base) and `handler.py --test_input` inside it,
    cold and warm weights cache on a mounted network volume. Minutes on a cold layer cache."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman mmdebstrap runc)")
    report_path = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "scripts/ops/podman_smoke.py", "--report", str(report_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=3500)
    assert report_path.exists(), proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    print(json.dumps({k: v for k, v in report.items() if k != "layer_sizes"}, indent=1))
    assert proc.returncode == 0 and report["ok"], report.get("error") or proc.stderr[-3000:]
    for run in ("cold", "warm"):
        assert report[run]["returncode"] == 0
        assert report[run]["png_size"] == [64, 64]
    assert report["worker_uid"] == 1000  # the worker does not run as root...
    assert report["volume_cache_owner_uid"] == 1000  # ...and the entrypoint handed the volume's cache to it
