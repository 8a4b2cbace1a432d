"""End-to-end check of the RunPod image with podman: build Dockerfile.runpod and run the handler inside it.

Steps: make the base image when it is a missing ``localhost/`` one (mmdebstrap + ``podman import``; no registry
needed) -> ``podman build`` of Dockerfile.runpod with the CPU torch -> the tiny model (devtools/tiny_models.py)
-> ``python handler.py --test_input ...`` in the container, without network, the tiny model mounted read-only as
the weights bucket and an empty folder as the RunPod network volume; run twice (cold cache, then warm cache) ->
checks (exit status, "completed successfully", a PNG of the requested size in the output, the weights cache on the
volume owned by the worker user) -> timings and image size.

    python scripts/ops/podman_smoke.py                 # cached build (fast when only code changed)
    python scripts/ops/podman_smoke.py --no-cache      # cold build
    python scripts/ops/podman_smoke.py --base docker.io/library/debian:bookworm-slim   # where a registry is reachable

The CPU torch wheel comes from the folder named by $PIP_FIND_LINKS when it holds one (mounted into the build),
else from PyTorch's CPU index. A CA bundle ($PIP_CERT, else the system bundle) is mounted for pip, for hosts whose
egress goes through a TLS-intercepting proxy. Exit status 0 when every check passed; a JSON report with the
figures goes to stdout's last line and to --report.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = "localhost/sd-serverless-runpod:smoke"
DEFAULT_BASE = "localhost/debian-base:bookworm"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
WORKER_UID = 1000  # Dockerfile.runpod's APP_UID default
SIZE = 64
TEST_INPUT = {
    "input": {"prompt": "a lighthouse at dawn", "seed": 7, "width": SIZE, "height": SIZE, "num_inference_steps": 2}
}
# handler.py logs "ready in N s" when its cold start (engine import, model fetch and load) is done; the RunPod SDK
# then prints its banner as the worker loop begins.
READY_RE = re.compile(r"\bready in ([0-9.]+) ?s")
LOOP_MARK = "Starting Serverless Worker"
DONE_MARK = "completed successfully"
PNG_B64_MAGIC = "iVBORw0KGgo"  # base64 of the PNG signature


class SmokeError(RuntimeError):
    """A step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"[smoke] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, capture: bool = False, log_file: Path | None = None) -> str:
    """Run a command; raise SmokeError with its tail when it fails."""
    if log_file is not None:
        with log_file.open("w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise SmokeError(f"{cmd[0]} {cmd[1]} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
        return ""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SmokeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout if capture else ""


def require_tools(names: list[str]) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SmokeError(f"not on PATH: {', '.join(missing)} (Debian/Ubuntu: apt-get install podman mmdebstrap)")


def image_exists(image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image]).returncode == 0


def ensure_base(base: str, workdir: Path, report: dict) -> None:
    """Make a ``localhost/`` Debian base with mmdebstrap when it is missing; other names are pulled by the build."""
    if not base.startswith("localhost/") or image_exists(base):
        return
    require_tools(["mmdebstrap"])
    suite = base.rsplit(":", 1)[1] if ":" in base.rsplit("/", 1)[-1] else "bookworm"
    rootfs = workdir / f"rootfs-{suite}.tar"
    log(f"making base image {base} (mmdebstrap --variant=minbase {suite})")
    started = time.monotonic()
    run(["mmdebstrap", "--variant=minbase", suite, str(rootfs)], log_file=workdir / "mmdebstrap.log")
    run(["podman", "import", str(rootfs), base])
    rootfs.unlink()
    report["base_build_s"] = round(time.monotonic() - started, 1)


def torch_source() -> tuple[list[str], str]:
    """Build flags choosing the CPU torch: the local wheel folder when it has one, else PyTorch's CPU index."""
    folder = os.environ.get("PIP_FIND_LINKS", "").split(" ")[0]
    if folder and Path(folder).is_dir() and any(Path(folder).glob("torch-*+cpu-*.whl")):
        return ["--volume", f"{folder}:/wheels:ro", "--build-arg", "TORCH_FIND_LINKS=/wheels"], f"wheels in {folder}"
    return ["--build-arg", f"TORCH_INDEX_URL={CPU_TORCH_INDEX}"], CPU_TORCH_INDEX


def ca_bundle_flags() -> list[str]:
    bundle = Path(os.environ.get("PIP_CERT") or SYSTEM_CA_BUNDLE)
    if not bundle.is_file():
        return []
    return ["--volume", f"{bundle}:/run/pip-ca.crt:ro", "--build-arg", "PIP_CERT=/run/pip-ca.crt"]


def build(args: argparse.Namespace, workdir: Path, report: dict) -> None:
    torch_flags, torch_from = torch_source()
    cmd = ["podman", "build", "--isolation=chroot", "-f", str(REPO / "Dockerfile.runpod"), "-t", args.image,
           "--build-arg", f"BASE_IMAGE={args.base}", *torch_flags, *ca_bundle_flags()]
    if args.no_cache:
        cmd.append("--no-cache")
    cmd.append(str(args.context))
    log(f"building {args.image} (base {args.base}, torch from {torch_from}{', no cache' if args.no_cache else ''})")
    started = time.monotonic()
    run(cmd, log_file=workdir / "build.log")
    report["build_s"] = round(time.monotonic() - started, 1)
    report["build_cache"] = not args.no_cache
    log(f"built in {report['build_s']} s (log {workdir / 'build.log'})")


def image_facts(image: str) -> dict:
    size = int(run(["podman", "image", "inspect", "--format", "{{.Size}}", image], capture=True).strip())
    history = json.loads(run(["podman", "history", "--format", "json", image], capture=True))
    layers = [
        {"size_mb": round(entry["size"] / 1e6, 1), "created_by": " ".join(entry.get("CreatedBy", "").split())[-90:]}
        for entry in history
        if entry.get("size", 0) > 0
    ]
    return {"image_size_mb": round(size / 1e6, 1), "layers": len(layers), "layer_sizes": layers}


def ensure_tiny_model(workdir: Path) -> Path:
    bucket = workdir / "bucket"
    if not (bucket / "tiny-sd15" / "diffusers" / "model_index.json").is_file():
        log(f"building the tiny model into {bucket}")
        run([sys.executable, str(REPO / "devtools" / "tiny_models.py"), "--out", str(bucket), "--arch", "sd15"],
            log_file=workdir / "tiny_model.log")
    # The weights are written 0600; the worker in the container runs as another user and reads them through a mount.
    for path in [bucket, *bucket.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return bucket


def podman_run_cmd(args: argparse.Namespace, extra: list[str]) -> list[str]:
    cmd = ["podman"]
    if args.runtime:
        cmd += ["--runtime", args.runtime]
    return cmd + ["run", "--rm", "--network=none", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096",
                  *extra]


def png_size(output: str) -> tuple[int, int] | None:
    """Width and height of the first base64 PNG in the output (its IHDR is within the first 33 bytes)."""
    match = re.search(PNG_B64_MAGIC + r"[A-Za-z0-9+/]{33}", output)
    if not match:
        return None
    try:
        head = base64.b64decode(match.group(0)[:44])
    except binascii.Error:
        return None
    if head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def run_handler(args: argparse.Namespace, bucket: Path, volume: Path, label: str, workdir: Path) -> dict:
    """One ``handler.py --test_input`` run, its output timestamped line by line."""
    cmd = podman_run_cmd(args, [
        "-v", f"{bucket}:/bucket:ro", "-v", f"{volume}:/runpod-volume",
        "-e", "SD_WEIGHTS_URI=/bucket", "-e", "SD_DEFAULT_MODEL=tiny-sd15", "-e", "SD_DEVICE=cpu",
        "-e", "HF_HUB_OFFLINE=1",
        args.image, "python", "-u", "handler.py", "--test_input", json.dumps(TEST_INPUT),
    ])
    log(f"{label}: python handler.py --test_input in the container")
    started = time.monotonic()
    marks: dict[str, float] = {}
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        now = round(time.monotonic() - started, 2)
        lines.append(line)
        marks.setdefault("first_output_s", now)
        ready = READY_RE.search(line)
        if ready and "ready_s" not in marks:
            marks["ready_s"] = now
            marks["cold_start_in_process_s"] = float(ready.group(1))
        if LOOP_MARK in line:
            marks.setdefault("worker_loop_s", now)
        if DONE_MARK in line:
            marks.setdefault("job_done_s", now)
    returncode = proc.wait()
    marks["exit_s"] = round(time.monotonic() - started, 2)
    output = "".join(lines)
    (workdir / f"handler-{label}.log").write_text(output)
    result = {"returncode": returncode, **marks, "png_size": png_size(output)}
    problems = []
    if returncode != 0:
        problems.append(f"exit status {returncode}")
    if "ready_s" not in marks:
        problems.append("no 'ready in N s' line from handler.py")
    if "job_done_s" not in marks:
        problems.append(f"no '{DONE_MARK}' line")
    if result["png_size"] != (SIZE, SIZE):
        problems.append(f"no {SIZE}x{SIZE} base64 PNG in the output (found {result['png_size']})")
    if problems:
        tail = "".join(lines[-30:])
        raise SmokeError(f"{label} handler run: {'; '.join(problems)}; log {workdir}/handler-{label}.log:\n{tail}")
    log(f"{label}: ready {marks['ready_s']} s after podman run (cold start in the worker "
        f"{marks['cold_start_in_process_s']} s), job done {marks['job_done_s']} s, exit {marks['exit_s']} s")
    return result


def check_worker_user(args: argparse.Namespace) -> dict:
    """Without a network volume the worker must run as the unprivileged user, its cache in that user's home."""
    probe = "import os; from sd_core.settings import Settings; print(os.getuid(), Settings.from_env().cache_dir)"
    out = run(podman_run_cmd(args, [args.image, "python", "-c", probe]), capture=True).strip().splitlines()
    uid, cache_dir = out[-1].split(" ", 1) if out else ("?", "?")
    if uid != str(WORKER_UID):
        raise SmokeError(f"the worker runs as uid {uid}, not {WORKER_UID} (cache {cache_dir}): {out}")
    return {"worker_uid": int(uid), "worker_cache_dir": cache_dir}


def check_volume(args: argparse.Namespace, volume: Path) -> dict:
    """The entrypoint must have handed the cache on the volume to the worker user (checked inside the container, so
    that rootless podman's uid mapping does not matter)."""
    script = "cd /runpod-volume/sd-cache 2>/dev/null || exit 0; stat -c %u .; find . -type f | wc -l; du -sm .|cut -f1"
    out = run(podman_run_cmd(args, ["--user", "0", "--entrypoint", "sh", "-v", f"{volume}:/runpod-volume",
                                    args.image, "-c", script]), capture=True).split()
    if len(out) != 3:
        raise SmokeError(f"{volume}: the worker made no weights cache sd-cache/ on the network volume")
    owner, files, megabytes = (int(value) for value in out)
    if owner != WORKER_UID:
        raise SmokeError(f"{volume}/sd-cache: owned by uid {owner} in the container, not the worker's {WORKER_UID}")
    return {"volume_cache_owner_uid": owner, "volume_cache_files": files, "volume_cache_mb": megabytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"tag to build and run (default {DEFAULT_IMAGE})")
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"BASE_IMAGE build argument (default {DEFAULT_BASE})")
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "images", help="logs, tiny model, volume")
    parser.add_argument("--context", type=Path, default=REPO, help="build context (default: the repository)")
    parser.add_argument("--no-cache", action="store_true", help="cold build: no layer cache")
    parser.add_argument("--skip-build", action="store_true", help="run the image already tagged --image")
    parser.add_argument("--runtime", default="runc" if shutil.which("runc") else None,
                        help="OCI runtime for podman run (default: runc when installed)")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    report: dict = {"image": args.image, "base": args.base}
    try:
        require_tools(["podman"])
        args.workdir.mkdir(parents=True, exist_ok=True)
        if not args.skip_build:
            ensure_base(args.base, args.workdir, report)
            build(args, args.workdir, report)
        elif not image_exists(args.image):
            raise SmokeError(f"--skip-build: no image {args.image}")
        report.update(image_facts(args.image))
        log(f"image {report['image_size_mb']} MB in {report['layers']} layers")
        started = time.monotonic()
        run(podman_run_cmd(args, [args.image, "true"]))
        report["container_start_s"] = round(time.monotonic() - started, 2)
        report.update(check_worker_user(args))
        bucket = ensure_tiny_model(args.workdir)
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="runpod-volume-") as volume:
            os.chmod(volume, 0o755)  # as RunPod's: root-owned, not writable for others
            report["cold"] = run_handler(args, bucket, Path(volume), "cold", args.workdir)
            report["warm"] = run_handler(args, bucket, Path(volume), "warm", args.workdir)
            report.update(check_volume(args, Path(volume)))
            # Files the worker wrote are owned by its uid: remove them through the container, as root.
            subprocess.run(podman_run_cmd(args, ["--user", "0", "--entrypoint", "rm", "-v", f"{volume}:/v",
                                                 args.image, "-rf", "/v/sd-cache"]), capture_output=True)
    except SmokeError as exc:
        log(f"FAILED: {exc}")
        report["ok"] = False
        report["error"] = str(exc)[:2000]
    else:
        report["ok"] = True
        log("passed")
    text = json.dumps(report)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
