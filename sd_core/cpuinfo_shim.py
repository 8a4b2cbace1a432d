"""py-cpuinfo's CPU name read in-process from /proc/cpuinfo, for imports that ask for it (runpod's: ~1 s otherwise)."""

# runpod.serverless.utils.rp_debugger calls cpuinfo.get_cpu_info()["brand_raw"] when it is imported (for its
# --rp_debugger output). py-cpuinfo 9 has no option or environment variable to skip its work: unless the process is
# frozen, get_cpu_info() starts a second Python interpreter (`python cpuinfo.py --json`), which runs `cat`, `lscpu`,
# `dmesg`, ... and a CPUID probe in a third process: ~1.2 s of a worker's cold start on 2 cores. `brand_raw` on Linux
# is the first /proc/cpuinfo line named "model name", "cpu", "processor" or "uarch" whose value is not a number
# (py-cpuinfo's own reading of that file comes before its other sources, which only fill fields still missing), so
# `in_process_brand()` gives the same string without a process. Elsewhere (no such line, no /proc/cpuinfo) the real
# get_cpu_info() runs as before.

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

PROC_CPUINFO = Path("/proc/cpuinfo")
BRAND_FIELDS = ("model name", "cpu", "processor", "uarch")  # py-cpuinfo's names for brand_raw, in its order


def in_process_brand(text: str | None = None) -> str | None:
    """py-cpuinfo's ``brand_raw`` from /proc/cpuinfo's text (read here when not given); None if it has none."""
    if text is None:
        try:
            text = PROC_CPUINFO.read_text(errors="replace")
        except OSError:
            return None
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        if key.lower() in BRAND_FIELDS and value and not value.isdigit():
            return value
    return None


@contextlib.contextmanager
def cpu_brand_in_process() -> Iterator[None]:
    """While inside: ``cpuinfo.get_cpu_info()`` answers ``{"brand_raw": <in_process_brand()>}`` with no subprocess
    (only when /proc/cpuinfo names the CPU; else the real call). py-cpuinfo is restored on exit."""
    try:
        import cpuinfo
    except ImportError:  # nothing to speed up
        yield
        return
    original = cpuinfo.get_cpu_info

    def get_cpu_info() -> dict:
        brand = in_process_brand()
        return {"brand_raw": brand} if brand is not None else original()

    cpuinfo.get_cpu_info = get_cpu_info
    try:
        yield
    finally:
        cpuinfo.get_cpu_info = original
