"""Benchmark `imports`: python -X importtime of sd_core, the engine and the Cog and RunPod adapters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scripts.bench.common import ROOT, log

IMPORTS = {
    "sd_core": "import sd_core",
    "sd_core.engine": "import sd_core.engine",
    "sd_core.engine + diffusers pipeline": "import sd_core.engine, diffusers; diffusers.StableDiffusionPipeline",
    "predict.py (Cog adapter)": "import predict",
    "handler.py (RunPod adapter)": "import handler",
}


def importtime(code: str) -> tuple[float, dict[str, float]]:
    """One fresh `python -X importtime -c code`: (total import seconds, {top-level package: seconds of its own})."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{code!r} failed:\n{proc.stderr[-2000:]}")
    by_package: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # not a timing line, or the header
        package = parts[2].strip().split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(parts[0]) / 1e6  # self time: no double counting
    return sum(by_package.values()), by_package


def bench(args, work: Path) -> dict:
    out = {}
    rounds = 1 if args.smoke else 3
    log(f"python -X importtime, fresh process each, median of {rounds}; the packages that cost most (own time):")
    for label, code in IMPORTS.items():
        if args.smoke and "engine" in label:
            continue  # seconds each: the smoke run only proves the command works
        runs = sorted(importtime(code) for _ in range(rounds))
        total, packages = runs[len(runs) // 2]
        heavy = sorted(packages.items(), key=lambda item: -item[1])[:6]
        out[label] = {"seconds": round(total, 3), "top": {name: round(sec, 3) for name, sec in heavy}}
        log(f"  {label:<36} {total * 1000:6.0f} ms: " + ", ".join(f"{n} {sec * 1000:.0f}" for n, sec in heavy))
    return out
