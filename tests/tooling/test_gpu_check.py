"""The one-shot GPU check (scripts/gpu_check.sh) runs its whole code path on a CPU (--tiny) and prints its table; the
real-size model configs it builds from have the published parameter counts."""

import os
import subprocess
from pathlib import Path

import pytest

from scripts.bench.gpu_check import HEADER, ROWS
from scripts.bench.gpu_models import REAL_PARAMS_M, param_counts_m

ROOT = Path(__file__).resolve().parents[2]
CHILD_ROWS = ("cold-sd15", "cold-sdxl", "compile-sd15")  # fresh processes: ~15-40 s each on a small CPU


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_configs_build_the_real_sizes(arch):
    counts = param_counts_m(arch)  # meta device: no memory, no init
    for component, millions in counts.items():
        assert millions == pytest.approx(REAL_PARAMS_M[(arch, component)], rel=2e-3), component
    tiny = param_counts_m(arch, tiny=True)  # the --tiny widths go through the same configs
    assert set(tiny) == set(counts) and all(tiny[c] < counts[c] / 20 for c in counts)


def run_check(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        ["scripts/gpu_check.sh", "--tiny", "--work", str(tmp_path / "work"), *args], cwd=ROOT, text=True,
        capture_output=True, timeout=900,
        env={**os.environ, "OUT": str(out), "GPU_CHECK_TIMEOUT_S": "890"},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (out / "gpu_check.md").read_text() == proc.stdout  # what comes back from the device tool
    return proc.stdout


def table_rows(text: str) -> dict[str, list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(HEADER) + " |"
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert len(cells) == len(HEADER), line
        rows[cells[0]] = cells
    return rows


def check_table(text: str, skipped: tuple[str, ...]) -> dict[str, list[str]]:
    assert "GPU: **no GPU (CPU)**" in text
    rows = table_rows(text)
    assert list(rows) == [name for _, name in ROWS]
    assert "error" not in text
    for key, name in ROWS:
        notes = rows[name][-1]
        if key in skipped:
            assert notes == "skipped: --skip"
        elif key.startswith("xformers"):
            assert notes == "skipped: xformers needs CUDA"
        else:
            assert "skipped" not in notes and rows[name][3] != "-", rows[name]
    return rows


def test_tiny_dry_run_prints_every_row(tmp_path):
    rows = check_table(run_check(tmp_path, "--skip", ",".join(CHILD_ROWS)), CHILD_ROWS)
    for name in ("SD1.5 batch 1", "SDXL batch 1"):  # the engine computed exactly what bare diffusers did
        assert rows[name][-1].endswith("same pixels as bare: max diff 0"), rows[name]
    assert "img/s" in rows["SDXL batch 4"][2] and "img/s" in rows["SDXL batch 4"][3]
    assert rows["LoRA switch vs reload (SD1.5)"][4].startswith("reload / warm switch")


@pytest.mark.slow  # the rows in fresh processes (cold starts, torch.compile): minutes on a small CPU
def test_tiny_dry_run_with_cold_starts_and_compile(tmp_path):
    rows = check_table(run_check(tmp_path), ())
    assert rows["cold start SDXL"][3].startswith("ready ")
    assert "torch.compile" in rows["SD1.5 batch 1, torch.compile UNet"][1]
