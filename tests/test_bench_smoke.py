"""The benchmark entry point (scripts/bench.py) runs on a fresh checkout and prints its figures (no timing asserts)."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_runs_in_smoke_mode_and_prints_its_figures(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "all", "--smoke", "--model-cache", str(tmp_path / "models"),
         "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    text = proc.stdout
    assert proc.returncode == 0, text[-5000:]
    for section in ("imports", "overhead", "batch", "coldstart", "lora", "fetch"):
        assert f"===== {section} =====" in text
    assert "ratio engine / bare diffusers:" in text
    assert "ratio 2 concurrent (batched) / sequential:" in text
    assert "ratio cold start from S3 / from warm cache:" in text
    assert "reload/warm" in text  # scripts/bench_lora.py's table
    assert "ours/boto3" in text  # scripts/bench_fetch.py's summary

    figures = json.loads(out.read_text())
    assert figures["imports"]["sd_core"]["seconds"] > 0
    overhead = figures["overhead"]
    assert overhead["max_pixel_diff"] == 0  # the engine ran the very same computation as the bare pipeline call
    assert overhead["median_ms"]["engine"] > 0 and overhead["median_ms"]["bare"] > 0
    assert figures["batch"]["rows"]["2 concurrent, batching on"]["images_per_s"] > 0
    seconds = figures["coldstart"]["seconds"]
    assert all(math.isfinite(seconds[source]["ready"]) and seconds[source]["ready"] > 0 for source in ("s3", "warm"))
    assert "error" not in figures["lora"] and "error" not in figures["fetch"]
    assert figures["machine"]["cpus"] >= 1 and figures["libraries"]["torch"]
