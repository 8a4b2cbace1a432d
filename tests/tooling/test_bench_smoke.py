"""The benchmark entry point (python -m scripts.bench) runs on a fresh checkout and prints its figures (no timing
asserts)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path: Path, *args: str) -> tuple[str, dict]:
    """`python -m scripts.bench ARGS --smoke` in a fresh process: (its output, the figures it wrote as JSON)."""
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench", *args, "--smoke", "--model-cache", str(tmp_path / "models"),
         "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout, json.loads(out.read_text())


def test_imports_overhead_batch_and_fetch_benchmarks_print_their_figures(tmp_path):
    text, figures = run_bench(tmp_path, "all", "--skip", "coldstart,lora,controlnet")  # its own test
    for section in ("imports", "overhead", "prompt", "batch", "fetch"):
        assert f"===== {section} =====" in text
    assert "ratio engine / bare diffusers:" in text
    assert "ratio engine with batching off / bare (same thread):" in text
    assert "ratio plain prompt engine / bare diffusers:" in text and "ratio weighted prompt / plain prompt" in text
    assert "ratio 2 concurrent (batched) / sequential:" in text
    assert "ours/boto3" in text  # scripts/bench/fetch.py's summary

    assert figures["imports"]["sd_core"]["seconds"] > 0
    overhead = figures["overhead"]
    assert overhead["max_pixel_diff"] == 0  # the engine ran the very same computation as the bare pipeline call
    assert overhead["median_ms"]["engine"] > 0 and overhead["median_ms"]["bare"] > 0
    assert figures["batch"]["rows"]["2 concurrent, batching on"]["images_per_s"] > 0
    assert "error" not in figures["fetch"]
    assert figures["machine"]["cpus"] >= 1 and figures["libraries"]["torch"]


@pytest.mark.slow  # ~35 s: three more processes that import torch and diffusers
def test_coldstart_and_lora_benchmarks_print_their_figures(tmp_path):
    text, figures = run_bench(tmp_path, "all", "--skip", "imports,overhead,batch,fetch,controlnet")
    assert "ratio cold start from S3 / from warm cache:" in text
    assert "reload/warm" in text  # scripts/bench/lora.py's table
    seconds = figures["coldstart"]["seconds"]
    assert all(math.isfinite(seconds[source]["ready"]) and seconds[source]["ready"] > 0 for source in ("s3", "warm"))
    assert "ratio first request after ready / warm request (target <= 1.2x):" in text
    assert seconds["warm"]["first_image"] > seconds["warm"]["ready"] and seconds["warm"]["warmup"] > 0
    assert seconds["nowarmup"]["warmup"] == 0 and set(figures["coldstart"]["first_vs_warm_request"]) == {
        "warm", "s3", "nowarmup"}
    assert figures["coldstart"]["ready_no_overlap_s"] > 0  # the S3 cold start with SD_OVERLAP_LOAD=0, side by side
    assert "error" not in figures["lora"]


def test_controlnet_benchmark_prints_its_costs_as_ratios_to_a_plain_generation(tmp_path):
    text, figures = run_bench(tmp_path, "controlnet")
    assert "===== controlnet =====" in text and "ratio one unit / plain:" in text
    for label in ("plain generation", "one unit", "switch to another ControlNet", "two units", "first use"):
        assert label in text
    ratios = figures["controlnet"]["vs_plain"]
    assert set(ratios) == {"plain", "one unit", "switch", "two units", "first use"} and ratios["plain"] == 1
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
